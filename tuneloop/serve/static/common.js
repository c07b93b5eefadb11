/* What the tuneloop pages (/, /admin, /review) share: a key kept in this browser's localStorage,
   and JSON calls to the API whose errors become their message. No library, no build step. */
var tuneloop = (function () {
  "use strict";

  function storageGet(name) { try { return localStorage.getItem(name) || ""; } catch (e) { return ""; } }
  function storageSet(name, value) { try { localStorage.setItem(name, value); } catch (e) { /* private mode */ } }

  // GET/POST JSON with a Bearer key (none when empty); resolves to the parsed body (an empty body: {}),
  // rejects with an Error carrying the API's error message and the HTTP status.
  function request(method, path, key, body) {
    var headers = { "Accept": "application/json" };
    if (key) headers["Authorization"] = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, { method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body) })
      .catch(function () { throw new Error("Cannot reach the server (" + path + ")."); })
      .then(function (res) {
        return res.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (!res.ok) {
            var err = new Error(data && data.error && data.error.message ? data.error.message : "HTTP " + res.status);
            err.status = res.status;
            throw err;
          }
          return data || {};
        });
      });
  }

  return { storageGet: storageGet, storageSet: storageSet, request: request };
})();
