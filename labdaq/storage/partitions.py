"""The samples table's layout on PostgreSQL: one plain table, or native declarative
partitions by hash of ``run_id`` (the ``samples_partitions`` setting).

Why hash of ``run_id``: every query on samples names one run (a page, a downsampled plot,
an export, the last sample at recovery), so the planner prunes to one partition; the
primary key ``(run_id, seq)`` contains the partition key, so PostgreSQL keeps it unique
across partitions and ``ON CONFLICT (run_id, seq)`` (the writer's replays) works as on one
table. Ranges of ``run_id`` or time would need partitions created as runs arrive; a fixed
number of hash partitions needs nothing after the migration. Each partition is a table
of its own (``samples_p0`` ...): its indexes and vacuum stay the size of its share.

The layout is chosen when migrations run: migration ``0019_nodes`` asks for
:func:`requested_partitions` (the value ``labdaq db upgrade`` / ``serve`` pass from the
settings, else ``LABDAQ_SAMPLES_PARTITIONS``) and :func:`apply_layout` moves the rows.
``labdaq db partition-samples N`` changes it later (0: back to one table). Moving
rewrites every row in one transaction: minutes per hundred million rows, with writes to
samples blocked meanwhile, so do it with the nodes stopped. SQLite has one layout.
"""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.engine import Connection

#: Environment variable read when migrations are run without an explicit choice.
ENV = "LABDAQ_SAMPLES_PARTITIONS"
#: Alembic config attribute through which :func:`labdaq.storage.db.upgrade` passes it.
ATTRIBUTE = "samples_partitions"
#: Partitions are named ``samples_p<remainder>``.
PREFIX = "samples_p"
MAX_PARTITIONS = 1024


def requested_partitions(attributes: dict[str, object]) -> int:
    """The number of partitions asked for: the migration's config attribute, else the
    environment; 0 for one plain table."""
    value = attributes.get(ATTRIBUTE)
    if value is None:
        value = os.environ.get(ENV) or 0
    n = int(str(value))
    if not 0 <= n <= MAX_PARTITIONS:
        raise ValueError(f"samples_partitions must be 0..{MAX_PARTITIONS}, not {n}")
    return n


def is_partition_name(name: str | None) -> bool:
    """A partition of samples (Alembic's comparison leaves them out: the model has one
    ``samples`` table, whatever its layout)."""
    return bool(name and name.startswith(PREFIX) and name[len(PREFIX):].isdigit())


def current_partitions(conn: Connection) -> int:
    """How many partitions samples has now (0: a plain table, and always on SQLite)."""
    if conn.dialect.name != "postgresql":
        return 0
    kind = conn.scalar(text(
        "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass('samples')"))
    if kind != "p":
        return 0
    return int(conn.scalar(text(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'samples'::regclass")) or 0)


def apply_layout(conn: Connection, partitions: int) -> bool:
    """Give samples ``partitions`` hash partitions (0: one plain table), keeping every
    row, the primary key and the foreign key to runs; in the caller's transaction.
    Returns whether anything changed (False on SQLite, or when it already has that)."""
    if conn.dialect.name != "postgresql" or current_partitions(conn) == partitions:
        return False
    if not 0 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"samples_partitions must be 0..{MAX_PARTITIONS}, not {partitions}")
    old = "samples_before_layout"
    # Writers wait here rather than insert into a table about to be dropped.
    conn.execute(text("LOCK TABLE samples IN ACCESS EXCLUSIVE MODE"))
    # Table and index names are schema-wide: free the model's, and the old partitions'
    # (a new partition may take the same name), for the new table.
    renames = [f"ALTER TABLE samples RENAME TO {old}",
               f"ALTER INDEX samples_pkey RENAME TO {old}_pkey"]
    for (index,) in conn.execute(text(
            "SELECT x.relname FROM pg_inherits i JOIN pg_index ix ON ix.indrelid = i.inhrelid "
            "JOIN pg_class x ON x.oid = ix.indexrelid "
            "WHERE i.inhparent = 'samples'::regclass")).all():
        renames.append(f'ALTER INDEX "{index}" RENAME TO "{old}_{index}"')
    for (child,) in conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'samples'::regclass")).all():
        renames.append(f'ALTER TABLE "{child}" RENAME TO "{old}_{child}"')
    for sql in (
        *renames,
        f"CREATE TABLE samples (LIKE {old} INCLUDING DEFAULTS)"
        + (" PARTITION BY HASH (run_id)" if partitions else ""),
        "ALTER TABLE samples ADD CONSTRAINT samples_pkey PRIMARY KEY (run_id, seq)",
        "ALTER TABLE samples ADD CONSTRAINT samples_run_id_fkey FOREIGN KEY (run_id) "
        "REFERENCES runs (id) ON DELETE CASCADE",
        *(f"CREATE TABLE {PREFIX}{i} PARTITION OF samples "
          f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})" for i in range(partitions)),
        f"INSERT INTO samples SELECT * FROM {old}",  # noqa: S608 - fixed names
        # CASCADE: the old partitions (when changing their number) go with their parent.
        f"DROP TABLE {old} CASCADE",
    ):
        conn.execute(text(sql))
    return True
