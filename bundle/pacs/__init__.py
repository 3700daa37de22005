"""PACS integration: retrieve a study, run the bundle's inference, send the evidence maps back, and
a DICOM node that does the same for every series it receives. ``scripts/pacs.py`` is the command
line; ``docs/pacs.md`` the user documentation.

- ``config``: ``configs/pacs.json`` (endpoints, folders, retry, listener, model); credentials from
  environment variables or a file outside the repository, never from the config file;
- ``dimse`` (pynetdicom: C-ECHO, C-GET, C-MOVE, C-STORE) and ``dicomweb`` (dicomweb-client:
  QIDO-RS, WADO-RS, STOW-RS), sharing ``protocol`` (errors naming the endpoint, retries);
- ``runner``: the inference config run as a child process;
- ``outbox``: jobs, their per-instance delivery state on disk, delivery with retries;
- ``pipeline``: on demand (retrieve -> infer -> deliver) and ``resend``;
- ``node``: the Store SCP that turns complete series into jobs.

Nothing here imports PyTorch or MONAI: inference runs in its own process.
"""
