"""Everything about imported nnU-Net v2 models: nothing here is imported until such a model is used.

recipe     the manifest's ``backend`` section for ``kind: nnunet`` (validation, JSON form)
pipeline   nnU-Net's inference recipe with ONNX Runtime and numpy; the nnU-Net backend
resampling nnU-Net's resampling rules (separate thick-slice axis, orders) over ndimage's resizes
tiling     sliding-window tile positions and Gaussian blending weights
convert    ``import-nnunet``: trained folders -> ONNX folds + manifest (needs torch and nnunetv2)
"""
