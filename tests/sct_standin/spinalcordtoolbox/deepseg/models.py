"""Stand-in of spinalcordtoolbox.deepseg.models: the MODELS/TASKS registry and its helpers.

Entries have the shape of SCT 7.4's (ivadomed and nnUNet models, one with `cropped_image`,
SCT's own EPI task `sc_epi`); only a few are kept.
"""
import glob
import os

from spinalcordtoolbox.utils.sys import __deepseg_dir__

MODELS = {
    "mice_uqueensland_sc": {
        "url": ["https://example.invalid/mice_uqueensland_sc.zip"],
        "description": "Cord segmentation model on mouse MRI.",
        "contrasts": ["t1"],
        "framework": "ivadomed",
        "thr": 0.0,
        "default": False,
    },
    "model_seg_sc_contrast_agnostic_nnunet": {
        "url": ["https://example.invalid/contrast_agnostic.zip"],
        "description": "Spinal cord segmentation agnostic to MRI contrasts",
        "contrasts": ["any"],
        "framework": "nnunetv2",
        "thr": None,
        "default": True,
        "cropped_image": True,
    },
    "model_seg_sc_epi_nnunet": {
        "url": ["https://example.invalid/fmri-segmentation.zip"],
        "description": "Spinal cord segmentation for EPI data (single 3D volume)",
        "contrasts": ["bold"],
        "framework": "nnunetv2",
        "thr": None,
        "default": False,
    },
}

TASKS = {
    "spinalcord": {
        "description": "Spinal cord segmentation on any contrast",
        "long_description": "A contrast-agnostic nnUNet model.",
        "url": "https://example.invalid/spinalcord",
        "models": ["model_seg_sc_contrast_agnostic_nnunet"],
        "citation": None,
        "group": "spinal_cord",
        "priority": 2,
    },
    "sc_epi": {
        "description": "Spinal cord segmentation for gradient-echo EPI data",
        "long_description": "An nnUNet model for 3D EPI volumes.",
        "url": "https://example.invalid/fmri-segmentation",
        "models": ["model_seg_sc_epi_nnunet"],
        "citation": "@article{EPI}",
        "group": "spinal_cord",
    },
    "sc_mouse_t1": {
        "description": "Cord segmentation on mouse MRI",
        "long_description": "An ivadomed model.",
        "url": "https://example.invalid/mice",
        "models": ["mice_uqueensland_sc"],
        "citation": None,
        "group": "spinal_cord",
        "priority": -1,
    },
}


def folder(name_model):
    return os.path.join(__deepseg_dir__, name_model)


def has_ivadomed_files(path_model):
    name = os.path.basename(os.path.normpath(path_model))
    return ((os.path.exists(os.path.join(path_model, f"{name}.pt")) or os.path.exists(os.path.join(path_model, f"{name}.onnx")))
            and os.path.exists(os.path.join(path_model, f"{name}.json")))


def has_pth_files(path_model):
    return bool(glob.glob(os.path.join(path_model, "**", "*.pth"), recursive=True))


def is_valid(path_models):
    paths = path_models if isinstance(path_models, list) else [path_models]
    return all(has_ivadomed_files(p) or has_pth_files(p) for p in paths)


def find_model_folder_paths(path_model):
    name = path_model.rstrip(os.sep).split(os.sep)[-1]
    subs = [d for d, _, _ in os.walk(path_model) if d.endswith(name) and d != path_model]
    return subs or [path_model]


def _order(name):
    return -TASKS[name].get("priority", 0), name


def list_tasks_string():
    lines = ["TASK".ljust(30) + "DESCRIPTION", "=" * 80]
    groups = {}
    for name in sorted(TASKS, key=_order):
        groups.setdefault(TASKS[name].get("group", "other"), []).append(name)
    for group, names in groups.items():
        lines += ["", group.replace("_", " ").upper(), "-" * 80]
        for name in names:
            installed = all(is_valid(find_model_folder_paths(folder(m))) for m in TASKS[name]["models"])
            mark = "+" if installed else "-"
            lines.append(f"{mark} {name.ljust(28)}{TASKS[name]['description']}")
    lines += ["", "Legend: + installed | - not installed"]
    return "\n".join(lines)
