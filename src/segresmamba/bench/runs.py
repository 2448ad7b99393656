"""Which measurement runs a table's rows come from, as one line of text for its header."""

from __future__ import annotations

import pandas as pd


def runs_text(table: pd.DataFrame) -> str:
    """``git <sha>`` when every row has one git SHA; else, per SHA, the models it measured (a table that
    later invocations merged rows into)."""
    shas = list(dict.fromkeys(str(s)[:7] for s in table.git_sha))
    if len(shas) == 1:
        return f"git {shas[0]}"
    sha7 = table.git_sha.astype(str).str[:7]
    return "rows from several runs: " + "; ".join(f"git {sha}: {', '.join(table.model[sha7 == sha])}" for sha in shas)
