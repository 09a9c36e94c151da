"""Hybrid search: full-text finds exact rare tokens that the embedding blurs."""

from __future__ import annotations

from memplug import Budget, Scope

CODES = ["XK9Q2", "XK9Q3", "XQ9K2", "KX9Q2", "XK2Q9", "QX9K2", "XK92Q", "X9KQ2", "XK9O2", "XKQ92"]


def test_rare_keyword_found_by_hybrid_but_not_by_vector_alone(make_memory, user):
    hybrid = make_memory(options={"pgvector_mode": "hybrid"})
    vector = make_memory(options={"pgvector_mode": "vector"})
    s = Scope(user)
    needle = "Reminder for later: XK9Q2."
    # Look-alike codes in look-alike sentences: the embedding cannot tell them apart.
    hay = [f"Reminder: {c} is the tracking number of the parcel." for c in CODES[1:]]
    hay += [f"Reminder for later: {c} needs renewing." for c in CODES[1:]]
    hybrid.write(s, hay + [needle])
    query = "What was XK9Q2 about?"

    top_vector = [h.text for h in vector.read(s, query, Budget(k=3)).hits]
    top_hybrid = [h.text for h in hybrid.read(s, query, Budget(k=3)).hits]
    assert needle not in top_vector
    assert top_hybrid[0] == needle

    text_only = make_memory(options={"pgvector_mode": "text"})
    assert [h.text for h in text_only.read(s, "XK9Q2", Budget(k=5)).hits] == [needle]


def test_rare_words_outweigh_common_ones(make_memory, user):
    text_only = make_memory(options={"pgvector_mode": "text"})
    s = Scope(user)
    text_only.write(s, [f"Weekly report {n}: the project is on track." for n in range(20)])
    text_only.write(s, "The project codename is Bluefin.")
    top = text_only.read(s, "project Bluefin", Budget(k=1)).hits[0]
    assert top.text == "The project codename is Bluefin."


def test_bulk_write_leaves_partition_statistics_current(memory, user):
    """Reads plan by word frequencies; a bulk write must not leave them an empty-table guess."""
    items = memory.write(Scope(user), [f"Bulk fact {n} about topic {n % 7}." for n in range(150)])
    with memory.store.transaction() as db:
        part, analysed = db.execute(
            "SELECT c.oid::regclass::text, c.reltuples FROM pgvector_items p JOIN pg_class c ON c.oid = p.tableoid "
            "WHERE p.item_id = %s", (items[0].id,)).fetchone()
        rows = db.execute(f"SELECT count(*) FROM {part}").fetchone()[0]
    assert analysed >= 0.8 * rows
