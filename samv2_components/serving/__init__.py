"""Serving SAMv2 through MONAI Label (``label_tasks``, needs the optional ``monailabel`` package)."""
