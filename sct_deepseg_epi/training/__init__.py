"""Training pipeline (the ``train`` extra): EPI simulation, data, network, fit, ONNX export.

``simulate``, ``data``, ``validate``, ``figures`` and ``benchmark`` need numpy only; ``net``,
``fit`` and ``export`` import torch (through :func:`sct_deepseg_epi._optional.require`).
Nothing outside this package imports it, so inference never loads torch.
"""
