"""`abcd-edge serve`: the runtime as an on-device HTTP service, with admission control.

* ``admission.py`` the FIFO and the decision to admit a request (its deadline counts from arrival);
* ``worker.py``    the one thread that runs admitted requests, in order, on the warm runtime;
* ``app.py``       the FastAPI app (``create_app``): POST /generate, GET /health, GET /openapi.json.

Only ``app.py`` imports fastapi; nothing here imports torch.
"""
