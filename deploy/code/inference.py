"""Serving handlers for the LoyaltyLens propensity model, run by deploy/server.py in the serving container.

The container unpacks `model.tar.gz` into /opt/ml/model, imports this file (`code/inference.py`) and calls
`model_fn(model_dir)` once, then per request `input_fn` -> `predict_fn` -> `output_fn` (the handler names SageMaker's
framework containers use). `model.onnx` holds the whole model: bucketing and normalising the six features, the
TabTransformer and the calibration map, with its input schema in the graph's metadata. So this file needs ONNX Runtime
and numpy only (no torch, no loyaltylens, no pandas), at the version `code/requirements.txt` pins.
"""
import json
import math
import os

import numpy as np
import onnxruntime as ort

JSON = "application/json"
MAX_ROWS = 10_000  # rows per request; larger batches belong to a batch transform job
INTRA_OP_THREADS = 1  # a request is a few rows: microseconds of arithmetic; concurrency comes from concurrent requests


def model_fn(model_dir):
    "Open `model.onnx` in an ONNX Runtime session and read the input schema stored in it (feature order, channel vocabulary)."
    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    return {"session": session, "schema": json.loads(session.get_modelmeta().custom_metadata_map["schema"])}


def _rows(payload):
    "The feature rows of a request: {'instances': [...]} (Vertex), a list of rows, or one row."
    if isinstance(payload, dict) and "instances" in payload: payload = payload["instances"]
    rows = [payload] if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not rows: raise ValueError("instances: expected a non-empty list of feature rows")
    if len(rows) > MAX_ROWS: raise ValueError(f"instances: {len(rows)} rows, more than {MAX_ROWS}")
    if not all(isinstance(r, dict) for r in rows): raise ValueError("instances: every row must be a JSON object")
    return rows


def input_fn(request_body, request_content_type=JSON):
    "Parse a JSON request body into a list of feature rows (ValueError naming the problem)."
    if request_content_type and not request_content_type.startswith(JSON):
        raise ValueError(f"content type {request_content_type!r}: only {JSON} is accepted")
    if isinstance(request_body, (bytes, bytearray)): request_body = request_body.decode("utf-8")
    try: payload = json.loads(request_body)
    except json.JSONDecodeError as e: raise ValueError(f"body is not JSON: {e.msg} at char {e.pos}") from None
    return _rows(payload)


def _number(row, i, col):
    v = row.get(col)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"instances[{i}].{col}: expected a finite number >= 0, got {v!r}")
    return float(v)


def predict_fn(input_data, model):
    "Calibrated redemption probabilities for the rows, in order."
    schema = model["schema"]
    channels = {c: k for k, c in enumerate(schema["channels"])}
    chan, num = [], []
    for i, row in enumerate(input_data):
        if row.get("channel_preference") not in channels:
            raise ValueError(f"instances[{i}].channel_preference: expected one of {schema['channels']}, got {row.get('channel_preference')!r}")
        chan.append(channels[row["channel_preference"]])
        num.append([_number(row, i, c) for c in schema["numeric_columns"]])
    feeds = {"channel": np.asarray(chan, dtype=np.int64), "numeric": np.asarray(num, dtype=np.float64)}
    return model["session"].run(None, feeds)[0].tolist()


def output_fn(prediction, accept=JSON):
    "JSON body {'predictions': [...]} (the same shape Vertex AI expects)."
    if accept and accept not in ("*/*",) and not accept.startswith(JSON):
        raise ValueError(f"accept {accept!r}: only {JSON} is produced")
    return json.dumps({"predictions": prediction})
