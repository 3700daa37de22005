"""PACS integration: retrieve studies, run inference, send the evidence maps back; a DICOM node."""
