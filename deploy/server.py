"""The serving container's HTTP server: SageMaker's and Vertex AI's custom-container contracts in one process.

SageMaker (bring-your-own container): `GET /ping` answers 200 when the model is loaded, `POST /invocations` scores,
on port 8080. Vertex AI: the port is `AIP_HTTP_PORT`, the health and predict paths are `AIP_HEALTH_ROUTE` and
`AIP_PREDICT_ROUTE`, requests are `{"instances": [...]}` and answers `{"predictions": [...]}`. Both routes run the
handlers of the model folder (`code/inference.py`), so what is tested here is what either cloud runs. Standard
library + what the handlers need (`code/requirements.txt`: ONNX Runtime and numpy).

    MODEL_DIR=/opt/ml/model python server.py
"""
import importlib.util
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SAGEMAKER_PORT = 8080  # the port SageMaker sends traffic to
MAX_BODY = 8 * 1024 * 1024  # bytes; larger requests get 413


def load_handlers(model_dir):
    "Import `code/inference.py` of `model_dir` and load the model with its `model_fn`."
    spec = importlib.util.spec_from_file_location("inference", os.path.join(model_dir, "code", "inference.py"))
    handlers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handlers)
    return handlers, handlers.model_fn(model_dir)


def make_handler(handlers, model, health_routes, predict_routes):
    "A request handler class bound to the loaded model and the contract's routes."
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status, body):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in health_routes: self._send(200, {"status": "ok"})
            else: self._send(404, {"error": f"no route GET {self.path}"})

        def do_POST(self):
            if self.path not in predict_routes: return self._send(404, {"error": f"no route POST {self.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY: return self._send(413, {"error": f"body of {size} bytes, more than {MAX_BODY}"})
            body = self.rfile.read(size)
            try:
                rows = handlers.input_fn(body, self.headers.get("Content-Type", handlers.JSON))
                out = handlers.output_fn(handlers.predict_fn(rows, model), self.headers.get("Accept", handlers.JSON))
            except ValueError as e: return self._send(400, {"error": str(e)})
            self._send(200, out)

        def log_message(self, fmt, *args): pass  # quiet: a serving container logs errors, not every request

    return Handler


def main():
    model_dir = os.environ.get("MODEL_DIR", "/opt/ml/model")  # SageMaker unpacks model.tar.gz here; the image bakes it in for Vertex
    port = int(os.environ.get("AIP_HTTP_PORT", SAGEMAKER_PORT))
    health = {"/ping", os.environ.get("AIP_HEALTH_ROUTE", "/ping")}
    predict = {"/invocations", os.environ.get("AIP_PREDICT_ROUTE", "/invocations")}
    handlers, model = load_handlers(model_dir)
    server = ThreadingHTTPServer((os.environ.get("HOST", "0.0.0.0"), port), make_handler(handlers, model, health, predict))
    print(f"serving {model_dir} on :{port} health {sorted(health)} predict {sorted(predict)}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
