"""SageMaker PyTorch serving handlers for the LoyaltyLens propensity model.

The SageMaker PyTorch inference container unpacks `model.tar.gz` into /opt/ml/model, imports this file
(`code/inference.py`) and calls, per request: `model_fn(model_dir)` once, then `input_fn` -> `predict_fn` -> `output_fn`.
`model.pt` is a TorchScript module that holds the whole model: bucketing and normalising the six features, the
TabTransformer and the calibration map. So this file needs torch only (no loyaltylens, no pandas).
"""
import json
import math
import os

import torch

JSON = "application/json"
MAX_ROWS = 10_000  # rows per request; larger batches belong to a batch transform job


def model_fn(model_dir):
    "Load `model.pt` and the input schema saved inside it (`schema.json`: feature order, channel vocabulary)."
    extra = {"schema.json": ""}
    module = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu", _extra_files=extra)
    return {"module": module.eval(), "schema": json.loads(extra["schema.json"])}


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
    with torch.inference_mode():
        p = model["module"](torch.tensor(chan, dtype=torch.long), torch.tensor(num, dtype=torch.float64))
    return p.tolist()


def output_fn(prediction, accept=JSON):
    "JSON body {'predictions': [...]} (the same shape Vertex AI expects)."
    if accept and accept not in ("*/*",) and not accept.startswith(JSON):
        raise ValueError(f"accept {accept!r}: only {JSON} is produced")
    return json.dumps({"predictions": prediction})
