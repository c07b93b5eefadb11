"""Where the heavy steps run: in this process, or on a Ray cluster (`compute.engine: ray`).

`ray_engine` holds the Ray side and imports Ray; it is imported only when a project asks for Ray,
so with `compute.engine: local` (the default) nothing imports Ray and the install without the
`ray` extra works.
"""
