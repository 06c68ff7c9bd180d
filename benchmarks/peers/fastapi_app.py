"""The FastAPI peer: the deployed handler's work behind uvicorn, as many users would serve it.

    uvicorn fastapi_app:app --app-dir benchmarks/peers --workers 2 --http httptools --loop uvloop

Same weights, same decode/preprocess/forward/postprocess (model_src/handler.py
through fmnist_inprocess), one torch thread per worker process. The endpoint
is `async def` on purpose: the work runs on the event loop, without a thread
pool hop; each worker process serves one prediction at a time, and uvicorn's
worker processes share the listening socket.
"""
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import fmnist_inprocess

app = FastAPI()
predictor = fmnist_inprocess.load(threads=1)


@app.get("/ping")
async def ping():
    return {"status": "Healthy"}


@app.api_route("/predictions/fmnist", methods=["POST", "PUT"])
async def predict(request: Request):
    body = await request.body()
    status, result = predictor.predict(body, request.headers.get("content-type", "application/octet-stream"))
    return JSONResponse(result, status_code=status)
