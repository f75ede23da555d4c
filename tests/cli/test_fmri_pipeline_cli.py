"""fmri-pipeline command line: flag spellings."""
from __future__ import annotations

from sct_deepseg_epi.cli.fmri_pipeline import get_parser


def test_t2_warp_is_an_alias_of_initwarp():
    a = get_parser().parse_args(["-i", "bold.nii.gz", "-t2-warp", "w.nii.gz", "-t2-warpinv", "v.nii.gz"])
    b = get_parser().parse_args(["-i", "bold.nii.gz", "-initwarp", "w.nii.gz", "-initwarpinv", "v.nii.gz"])
    assert (a.initwarp, a.initwarpinv) == (b.initwarp, b.initwarpinv) == ("w.nii.gz", "v.nii.gz")
