"""The --help layout every mdt-* CLI shares: the description as written and every default shown."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every default in --help; a None default means "derived"
    and its help says from what, so "(default: None)" is left off (as are store_true flags, an
    empty text default, which would print as "(default: )", and a help that states its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, "", argparse.SUPPRESS) or action.const is True or "(default" in text:
            return text
        return super()._get_help_string(action)
