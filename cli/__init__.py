"""The `wsi-histosge` command line (installed as ``wsi_histosge.cli``)."""
