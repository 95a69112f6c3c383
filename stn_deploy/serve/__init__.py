"""stn-serve: exported models over HTTP (Open Inference Protocol, dynamic batching, a web page); no torch.

``cli`` is the command, ``app`` the Starlette routes, ``protocol`` the request and response
bodies (pure functions), ``batching`` the dynamic batcher, ``model`` a served model (Session,
signature, batcher), ``metrics`` the Prometheus metrics, ``static/`` the page.
"""
