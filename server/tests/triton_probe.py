"""Run by test_tritonclient.py in its own interpreter: talks to a worker with NVIDIA's
tritonclient.grpc and prints what it saw as one JSON line.

Why a separate process: tritonclient registers its own generated `inference.*` protobuf messages
and so do we; one process cannot hold both ("duplicate symbol 'inference.ServerLiveRequest'").
Keeping the client unmodified in its own interpreter tests exactly what users run, while the
worker keeps the published package name `inference` that the wire protocol needs.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main(url: str, model: str, size: int, seed: int) -> None:
    client = triton.InferenceServerClient(url=url)
    frames = np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    data = triton.InferInput("frames", list(frames.shape), "UINT8")
    data.set_data_from_numpy(frames)
    result = client.infer(model, [data], outputs=[triton.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    metadata = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)["config"]
    try:
        client.get_model_metadata("no-such-model")
        missing = ""
    except triton.InferenceServerException as exc:
        missing = str(exc.status())
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready(model),
                "metadata": metadata,
                "max_batch_size": config["max_batch_size"],
                "logits_shape": list(logits.shape),
                "logits": logits.tolist(),
                "missing_model_status": missing,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
