"""Weights files: reading them safely (:mod:`.io`), their formats (:mod:`.formats`: Deformable-DETR layouts
and ISDA's), conversion into ISDA (:mod:`.convert`), export out of it (:mod:`.export`) and the report
(:mod:`.report`)."""

from .convert import convert_state_dict, load_pretrained
from .export import export_state_dict, save_converted
from .formats import COCO_CATEGORY_IDS, FORMATS, Layout, detect_format
from .io import WeightsError, load_torch_file, read_checkpoint
from .report import ConversionReport

__all__ = [
    "COCO_CATEGORY_IDS", "FORMATS", "ConversionReport", "Layout", "WeightsError", "convert_state_dict",
    "detect_format", "export_state_dict", "load_pretrained", "load_torch_file", "read_checkpoint", "save_converted",
]
