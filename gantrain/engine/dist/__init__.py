"""Where a run executes and how it is started: the device and the DDP process group (``runtime``), the torchrun
launcher (``launch``) and Ray Train (``raytrain``)."""
