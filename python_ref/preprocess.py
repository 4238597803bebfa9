"""Pixel references for `residual infer --image`: the tensors that timm's, torchvision's and
transformers' evaluation transforms make of a few small PNGs.

Writes into OUT/preprocess/:
  images/*.png             RGB, grayscale, RGBA, palette and grayscale+alpha PNGs of odd sizes,
                           from 13x9 (every case upscales it) to 200x150 (every case downscales it)
  <case>/config.json       timm cases: the config `timm.models._hub.save_config_for_hf` writes
                           (`pretrained_cfg` holds the data config); the transform is
                           `create_transform(**resolve_data_config({}, model=create_model("local-dir:...")))`
  <case>/preprocessor_config.json
                           transformers cases: what the image processor's `save_pretrained` writes
                           (or, `legacy_*`, the old feature-extractor form of microsoft/resnet-50);
                           the transform is `AutoImageProcessor.from_pretrained(dir, backend=...)`
  <case>/preprocess.json   torchvision cases: residual's own `Preprocess` JSON; the transform is
                           torchvision's `ImageClassification` preset on the decoded uint8 tensor
  references.safetensors   per case `<case>.pixels` (uint8 [3, H, W]: the resized and cropped image
                           before scaling and normalising; `[:, ::n, ::n]` for the cases of
                           PIXELS_STRIDE) and, for outputs of at most
                           OUTPUT_PIXELS pixels, `<case>.output` (float32 [3, H, W]: the transform's
                           result)
                           and `pil_resize.<i>`: `PIL.Image.resize` alone, on 60 random sizes
  cases.json               the cases: name, library, backend, image, the config file, shapes;
                           `pil_resize`: the image, size and filter of each `pil_resize.<i>`

Images are read as each library's own loaders read them: timm's datasets `Image.open(f).convert("RGB")`,
transformers' `load_image` (RGB), torchvision's `decode_image(path, ImageReadMode.RGB)`.

Run alone: `python python_ref/preprocess.py --out DIR` (writes DIR/preprocess/ only).
"""

import argparse
import importlib.util
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

# The pixels are those of these versions (python_ref/requirements.txt pins them): Pillow 13 changed
# the order of its two resampling passes, which shows in the rounding.
LIBRARIES = ["timm", "transformers"]


def missing_libraries() -> list:
    return [name for name in LIBRARIES if importlib.util.find_spec(name) is None]

# `pixels` of these cases are stored at every n-th row and column only (384 x 384 outputs).
PIXELS_STRIDE = {"hf_convnext_squash_384": 4}

# Outputs of more pixels than this are stored as `pixels` only (uint8), to keep the references small;
# normalisation is the same arithmetic on every size and is compared on the smaller cases.
OUTPUT_PIXELS = 48 * 48

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_images(folder: str) -> dict:
    """Deterministic test images: smooth ramps plus noise, so every resampling tap matters."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(2024)

    def ramp(h, w, c):
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        planes = [xx, yy, (xx + yy) / 2, 1 - xx][:c]
        smooth = np.stack(planes, axis=-1) * 190
        noise = rng.integers(0, 66, size=(h, w, c))
        return np.clip(smooth + noise, 0, 255).astype(np.uint8)

    images = {
        "rgb_200x150": Image.fromarray(ramp(150, 200, 3), "RGB"),
        "gray_37x61": Image.fromarray(ramp(61, 37, 1)[:, :, 0], "L"),
        "rgba_90x90": Image.fromarray(ramp(90, 90, 4), "RGBA"),
        "rgb_13x9": Image.fromarray(ramp(9, 13, 3), "RGB"),
        "palette_50x70": Image.fromarray(ramp(70, 50, 3), "RGB").quantize(colors=64),
        "la_33x20": Image.fromarray(ramp(20, 33, 2), "LA"),
    }
    paths = {}
    for name, image in images.items():
        path = os.path.join(folder, name + ".png")
        image.save(path, format="PNG")
        paths[name] = path
    return paths


def chw_uint8(pil_image) -> torch.Tensor:
    array = np.array(pil_image, dtype=np.uint8)
    assert array.ndim == 3 and array.shape[2] == 3, array.shape
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --- timm -------------------------------------------------------------------------------------------

# (case, image, data_config given to save_config_for_hf). resnet50d's own pretrained_cfg (224,
# bicubic, crop_pct 0.875) is the first.
TIMM_CASES = [
    ("timm_resnet50d_default", "rgb_200x150", None),
    *[(f"timm_bilinear_{img}", img, dict(input_size=(3, 40, 40), interpolation="bilinear", crop_pct=0.95))
      for img in ["rgb_200x150", "gray_37x61", "rgba_90x90", "rgb_13x9", "palette_50x70", "la_33x20"]],
    *[(f"timm_bicubic_hw_{img}", img, dict(input_size=(3, 40, 56), interpolation="bicubic", crop_pct=1.0))
      for img in ["rgb_200x150", "gray_37x61", "rgb_13x9"]],
    ("timm_bicubic_odd_gray", "gray_37x61", dict(input_size=(3, 33, 33), interpolation="bicubic", crop_pct=0.9)),
    ("timm_nearest_rgb", "rgb_200x150", dict(input_size=(3, 40, 40), interpolation="nearest", crop_pct=0.9)),
    ("timm_nearest_tiny", "rgb_13x9", dict(input_size=(3, 37, 37), interpolation="nearest", crop_pct=0.9)),
    ("timm_squash_gray", "gray_37x61", dict(input_size=(3, 48, 40), interpolation="bicubic", crop_pct=0.875,
                                            crop_mode="squash")),
    ("timm_border_rgb", "rgb_200x150", dict(input_size=(3, 48, 48), interpolation="bilinear", crop_pct=1.0,
                                            crop_mode="border")),
    ("timm_border_gray", "gray_37x61", dict(input_size=(3, 40, 56), interpolation="bicubic", crop_pct=0.95,
                                            crop_mode="border", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
    ("timm_pad_rgba", "rgba_90x90", dict(input_size=(3, 48, 48), interpolation="bicubic", crop_pct=1.15)),
    ("timm_lanczos", "rgb_200x150", dict(input_size=(3, 48, 48), interpolation="lanczos", crop_pct=0.875)),
    ("timm_box", "palette_50x70", dict(input_size=(3, 32, 32), interpolation="box", crop_pct=0.875)),
    ("timm_hamming", "rgb_200x150", dict(input_size=(3, 32, 32), interpolation="hamming", crop_pct=0.875,
                                         mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))),
]


def timm_case(out: str, name: str, image_path: str, data_config) -> dict:
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models._hub import save_config_for_hf

    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    model = timm.create_model("resnet50d" if data_config is None else "resnet18", pretrained=False)
    save_config_for_hf(model, os.path.join(folder, "config.json"), data_config=data_config)
    # timm's own reading of the folder, as `timm.create_model("local-dir:...")` gives it.
    loaded = timm.create_model("local-dir:" + folder, pretrained=False)
    transform = create_transform(**resolve_data_config({}, model=loaded), is_training=False)
    steps = transform.transforms
    assert type(steps[-2]).__name__ == "MaybeToTensor" and type(steps[-1]).__name__ == "Normalize", steps
    image = Image.open(image_path).convert("RGB")
    pixels = chw_uint8(type(transform)(steps[:-2])(image))
    output = transform(image)
    return {"config": f"{name}/config.json", "pixels": pixels, "output": output, "transform": repr(transform)}


# --- torchvision ------------------------------------------------------------------------------------

# (case, image, resize, crop, interpolation)
TORCHVISION_CASES = [
    ("torchvision_bilinear_rgb", "rgb_200x150", 57, 48, "bilinear"),
    ("torchvision_bilinear_gray", "gray_37x61", 40, 33, "bilinear"),
    ("torchvision_bicubic_rgba", "rgba_90x90", 51, 48, "bicubic"),
    ("torchvision_bicubic_tiny", "rgb_13x9", 45, 40, "bicubic"),
    ("torchvision_nearest_palette", "palette_50x70", 41, 36, "nearest"),
    ("torchvision_bilinear_la", "la_33x20", 72, 64, "bilinear"),
]


def torchvision_case(out: str, name: str, image_path: str, resize: int, crop: int, interpolation: str) -> dict:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    from torchvision.transforms._presets import ImageClassification

    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    mode = InterpolationMode(interpolation)
    preprocess = {
        "pipeline": "torchvision",
        "input_size": [3, crop, crop],
        "resize": resize,
        "interpolation": interpolation,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    with open(os.path.join(folder, "preprocess.json"), "w") as f:
        json.dump(preprocess, f, indent=1)
    image = decode_image(image_path, mode=ImageReadMode.RGB)
    preset = ImageClassification(crop_size=crop, resize_size=resize, interpolation=mode)
    # The preset's own steps, up to its conversion to float.
    pixels = F.center_crop(F.resize(image, [resize], interpolation=mode, antialias=True), [crop])
    return {"config": f"{name}/preprocess.json", "pixels": pixels, "output": preset(image), "transform": repr(preset)}


# --- transformers -----------------------------------------------------------------------------------

# (case, image, processor class or None for the legacy microsoft/resnet-50 file, its arguments)
TRANSFORMERS_CASES = [
    ("hf_legacy_resnet50", "rgb_200x150", None, None),
    *[(f"hf_convnext_{img}", img, "ConvNextImageProcessor",
       dict(size={"shortest_edge": 40}, crop_pct=0.875, resample=2,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)))
      for img in ["rgb_200x150", "gray_37x61", "rgba_90x90", "rgb_13x9", "palette_50x70", "la_33x20"]],
    ("hf_convnext_defaults", "gray_37x61", "ConvNextImageProcessor", dict(size={"shortest_edge": 41})),
    ("hf_convnext_pad", "rgb_200x150", "ConvNextImageProcessor",
     dict(size={"shortest_edge": 40}, crop_pct=1.1, resample=3)),
    ("hf_convnext_nearest", "rgb_13x9", "ConvNextImageProcessor",
     dict(size={"shortest_edge": 37}, crop_pct=0.9, resample=0)),
    ("hf_convnext_squash_384", "rgb_13x9", "ConvNextImageProcessor",
     dict(size={"shortest_edge": 384}, resample=3)),
    ("hf_vit", "gray_37x61", "ViTImageProcessor", dict(size={"height": 40, "width": 56}, resample=2)),
    ("hf_bit", "rgb_200x150", "BitImageProcessor",
     dict(size={"shortest_edge": 53}, crop_size={"height": 48, "width": 40}, resample=3)),
    ("hf_bit_rescale_only", "rgba_90x90", "BitImageProcessor",
     dict(size={"shortest_edge": 40}, crop_size=33, do_normalize=False)),
]

TORCHVISION_BACKEND_ONLY = {"hf_legacy_resnet50", "hf_convnext_squash_384"}

# microsoft/resnet-50's preprocessor_config.json, as published (the feature-extractor era format).
LEGACY_RESNET50 = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}


def transformers_case(out: str, name: str, image_path: str, cls, kwargs, backend: str) -> dict:
    import transformers
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    folder = os.path.join(out, name)
    if not os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        os.makedirs(folder, exist_ok=True)
        if cls is None:
            with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
                json.dump(LEGACY_RESNET50, f, indent=2)
        else:
            getattr(transformers, cls)(**kwargs).save_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder, backend=backend)
    assert processor.backend == backend, (processor, backend)
    image = load_image(image_path)
    output = processor(image, return_tensors="pt")["pixel_values"][0]
    pixels = processor(image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    assert pixels.dtype == torch.uint8, pixels.dtype
    return {"config": f"{name}/preprocessor_config.json", "pixels": pixels, "output": output,
            "transform": type(processor).__name__}


def export_preprocess(out_dir: str) -> dict:
    out = os.path.join(out_dir, "preprocess")
    shutil.rmtree(out, ignore_errors=True)
    paths = make_images(os.path.join(out, "images"))

    def image_entry(image):
        return os.path.relpath(paths[image], out)

    cases, tensors = [], {}

    def add(name, library, backend, image, result):
        pixels = result["pixels"].contiguous()
        output = result["output"].to(torch.float32).contiguous()
        assert pixels.shape == output.shape, (name, pixels.shape, output.shape)
        stride = PIXELS_STRIDE.get(name, 1)
        tensors[f"{name}.pixels"] = pixels[:, ::stride, ::stride].contiguous()
        stored_output = pixels.shape[1] * pixels.shape[2] <= OUTPUT_PIXELS
        if stored_output:
            tensors[f"{name}.output"] = output
        cases.append({
            "name": name,
            "library": library,
            "backend": backend,
            "image": image_entry(image),
            "config": result["config"],
            "shape": list(pixels.shape),
            "pixels_stride": stride,
            "output": stored_output,
            "transform": result["transform"],
        })

    for name, image, data_config in TIMM_CASES:
        add(name, "timm", "pil", image, timm_case(out, name, paths[image], data_config))
    for name, image, resize, crop, interpolation in TORCHVISION_CASES:
        add(name, "torchvision", "tensor", image,
            torchvision_case(out, name, paths[image], resize, crop, interpolation))
    for name, image, cls, kwargs in TRANSFORMERS_CASES:
        # The large outputs only with the default backend (the PIL one resamples as timm's cases do).
        for backend in ["torchvision"] if name in TORCHVISION_BACKEND_ONLY else ["torchvision", "pil"]:
            case = name if backend == "torchvision" else name + "_pil"
            result = transformers_case(out, name, paths[image], cls, kwargs, backend)
            add(case, "transformers", backend, image, result)

    # Pillow's resize alone, on random size pairs and every filter: which of its two passes runs
    # first depends on the sizes (Pillow 13), and each pass rounds.
    rng = np.random.default_rng(7)
    resizes = []
    filters = ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    for i in range(60):
        image = ["gray_37x61", "rgba_90x90", "rgb_13x9"][i % 3]
        source = Image.open(paths[image]).convert("RGB")
        width, height = (int(v) for v in rng.integers(2, 33, size=2))
        interpolation = filters[i % len(filters)]
        resized = source.resize((width, height), getattr(Image.Resampling, interpolation.upper()))
        tensors[f"pil_resize.{i}"] = chw_uint8(resized)
        resizes.append({"image": image_entry(image), "height": height, "width": width,
                        "interpolation": interpolation})

    save_file(tensors, os.path.join(out, "references.safetensors"))
    import timm
    import transformers
    from PIL import __version__ as pil_version

    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({
            "versions": {"timm": timm.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__, "pillow": pil_version,
                         "cpu_capability": torch.backends.cpu.get_cpu_capability()},
            "cases": cases,
            "pil_resize": resizes,
        }, f, indent=1)
    return {"preprocess": "preprocess", "preprocess_cases": len(cases)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="writes the image preprocessing references only")
    parser.add_argument("--out", default="target/python_ref")
    a = parser.parse_args()
    print(export_preprocess(a.out))
