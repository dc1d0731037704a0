"""Moved to `report.py`; this re-export lasts until pipeline.py imports from there."""

from .report import card_fields, member_folders, publish_stage, report_family  # noqa: F401
