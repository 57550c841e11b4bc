"""The artifact contract between training and the service: what a model folder holds and how to read it.

`training/` writes model folders and `app/` serves them; both import this package and never each other, so
that what training evaluates is exactly what the service serves:

- `manifest`: `manifest.json` as a pydantic model, one format version, validated on load;
- `torchscript`: saving and loading `model.pt` (TorchScript), its sha256, and the methods it must provide;
- `compiled`: the backbone as a `torch.export` program beside it, compiled ahead of time for the serving machine
  (an accelerator that never changes a score);
- `images`: decoding any supported upload or file into an upright RGB picture, with domain errors;
- `resize`: torchvision's antialiased bilinear resize of uint8 pictures, to the bit, in numpy;
- `picture`: a file to the model's uint8 picture (decoding, the manifest's resize policy), without torch, for
  processes that must not load it;
- `preprocess`: those pictures as tensors, and the normalisation to the model's input tensor;
- `explainers`: the explanation methods, one module each (`gradcam`, `contributions`), batched and hook-free,
  so that training can measure what the service shows;
- `memory`: glibc's malloc told to keep freed memory for reuse (both sides run the model) and to give it back.

model_store/README.md documents the contract for people; this package is its code.
"""
