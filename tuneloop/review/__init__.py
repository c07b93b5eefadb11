"""The expert review queue: how informative each question is (`scores.py`) and the queue in the
store, with what a reviewer's verdict becomes (`queue.py`). The cycle step that rebuilds the queue
is `stages/review.py`."""
