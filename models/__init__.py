"""Model manifests shipped with the package (installed as ``sct_deepseg_epi.models``)."""
