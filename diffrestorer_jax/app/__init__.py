"""The web app: restore in the browser, concurrent requests batched into the compiled programs.

`server.App` (the restorer pool, the batching worker, the jobs) behind `server.make_server` (a
threaded standard-library HTTP server and the page in static/); `diffrestorer-app` runs it.
"""
