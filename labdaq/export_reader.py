"""Child process that reads a run's samples from SQLite with ADBC and writes them to
stdout as an Arrow IPC stream (``python -m labdaq.export_reader '<json args>'``).

ADBC reads SQLite into Arrow several times faster than the ``sqlite3`` module's tuples,
but its driver carries its own copy of the SQLite library, which must not share a
process with another copy (the API's aiosqlite): see labdaq.export.connect. In a child
process of its own it is just another SQLite client, locking like any other.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa


def main(argv: list[str]) -> None:
    import adbc_driver_sqlite.dbapi as adbc_sqlite

    from labdaq.sample_arrow import SCHEMA, SampleFilter, chunk_sql, to_batch

    args = json.loads(argv[0])
    where = SampleFilter(**args["where"])
    extra = [v for _, v in where.conditions()]
    sql = chunk_sql("qmark", where)
    out = pa.output_stream(sys.stdout.buffer)
    # The URI form opens the file read-only: this process never writes the database.
    with adbc_sqlite.connect(f"file:{args['path']}?mode=ro") as conn, conn.cursor() as cur, \
            pa.ipc.new_stream(out, SCHEMA) as writer:
        last = args["after_seq"]
        while last < args["max_seq"]:
            cur.execute(sql, (args["run_id"], last, args["max_seq"], *extra, args["chunk_rows"]))
            table = cur.fetch_arrow_table()
            if table.num_rows == 0:
                break
            batch = to_batch(table)
            writer.write_batch(batch)
            last = int(batch.column(0)[-1].as_py())
            if table.num_rows < args["chunk_rows"]:
                break


if __name__ == "__main__":
    main(sys.argv[1:])
