"""docs/analysis_tables.md is generated from the migrations and matches a real store's tables."""
import importlib.util
from pathlib import Path

from store import Store

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("schema_doc", ROOT / "scripts" / "schema_doc.py")
schema_doc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(schema_doc)


def test_doc_is_up_to_date():
    assert schema_doc.OUT.read_text() == schema_doc.render(), "run `python scripts/schema_doc.py`"


def test_every_documented_column_exists_in_a_fresh_store(tmp_path):
    store = Store.create(tmp_path / "s")
    columns = store.sql("SELECT table_name, column_name FROM information_schema.columns")
    have = {(t, c) for t, c in columns.iter_rows()}
    documented, table = set(), None
    for line in schema_doc.render().splitlines():
        if line.startswith("### `"):
            table = line[5:-1]
        elif line.startswith("| ") and not line.startswith("| column") and table:
            documented.add((table, line.split("|")[1].strip()))
        elif line.startswith("- `"):
            name = line[3:line.index("`", 3)]
            documented.add(tuple(name.split(".")))
    assert documented and documented <= have, sorted(documented - have)
    created = {line[5:-1] for line in schema_doc.render().splitlines() if line.startswith("### `")}
    for t in created:                      # and no column of those tables goes undocumented
        assert {c for tt, c in have if tt == t} == {c for tt, c in documented if tt == t}, t
