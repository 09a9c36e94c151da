"""When things happened (occurred_at, time ranges), updates ranked first, the relevance floor, and
re-indexing: on the real Postgres and embedder."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from memplug import Budget, InvalidInput, Scope

UTC = UTC


def test_occurred_at_round_trips_and_is_shown(memory, user):
    s = Scope(user)
    first = memory.write(s, "Went skiing in the Alps.", occurred_at="2023-12-29T22:42:04")
    second = memory.write(s, "Started a pottery class.", occurred_at=date(2024, 1, 5))
    plain = memory.write(s, "Likes green tea.")
    assert first.occurred_at == datetime(2023, 12, 29, 22, 42, 4, tzinfo=UTC)  # naive: UTC
    assert second.occurred_at == datetime(2024, 1, 5, tzinfo=UTC)
    assert plain.occurred_at is None and plain.when == plain.created_at
    stored = {it.id: it for it in memory.get(s, [first.id, second.id, plain.id])}
    assert stored[first.id].occurred_at == first.occurred_at
    assert stored[second.id].occurred_at == second.occurred_at
    recall = memory.read(s, "when did they go skiing?", Budget(k=3))
    assert recall.hits[0].item.occurred_at == first.occurred_at
    text = recall.as_text()
    assert "[2023-12-29 22:42] Went skiing in the Alps." in text
    assert "[2024-01-05] Started a pottery class." in text  # midnight: the date alone
    assert "- Likes green tea." in text


def test_one_time_per_text_and_the_same_words_at_two_times(memory, user):
    s = Scope(user)
    items = memory.write(s, ["Ran 5 km.", "Ran 5 km.", "Swam."],
                         [{"n": 1}, {"n": 2}, {"n": 3}], occurred_at=["2024-03-01", "2024-03-08", None])
    assert len({it.id for it in items}) == 3  # the same words about two moments are two items
    assert [it.metadata["n"] for it in items] == [1, 2, 3]
    assert memory.write(s, "Ran 5 km.", occurred_at="2024-03-01").id == items[0].id
    [kept] = memory.put(s, ["k"], ["Moved to Porto."], occurred_at="2024-05-01")
    [same] = memory.put(s, ["k"], ["Moved to Porto."], occurred_at="2024-05-01")
    [moved] = memory.put(s, ["k"], ["Moved to Porto."], occurred_at="2024-06-01")
    assert same.id == kept.id and moved.id != kept.id and moved.occurred_at.month == 6


@pytest.mark.parametrize("value, message", [
    ("last tuesday", "ISO 8601"), (1700000000, "datetime"), (["2024-01-01"], "list of 1"),
])
def test_bad_times_are_refused_and_nothing_is_written(memory, user, value, message):
    s = Scope(user)
    with pytest.raises(InvalidInput, match=message):
        memory.write(s, ["one", "two"], occurred_at=value)
    assert memory.items(s) == []
    with pytest.raises(InvalidInput, match="since"):
        memory.read(s, "anything", since="yesterday")
    with pytest.raises(InvalidInput, match="empty"):
        memory.read(s, "anything", since="2024-02-01", until="2024-01-01")


def test_a_time_range_keeps_what_happened_in_it(memory, user):
    s = Scope(user)
    memory.write(s, ["Visited Kyoto.", "Visited Osaka.", "Visited Nara."],
                 occurred_at=["2023-04-02", "2024-04-02", "2025-04-02"])
    visits = lambda **r: [h.text for h in memory.read(s, "Which city did I visit?", **r).hits]  # noqa: E731
    assert set(visits()) == {"Visited Kyoto.", "Visited Osaka.", "Visited Nara."}
    assert visits(since="2024-01-01", until="2025-01-01") == ["Visited Osaka."]
    assert set(visits(since=date(2024, 1, 1))) == {"Visited Osaka.", "Visited Nara."}
    assert visits(until=datetime(2023, 12, 31, tzinfo=UTC)) == ["Visited Kyoto."]
    # An item without occurred_at happened when it was written.
    memory.write(s, "Visited Sapporo.")
    now = datetime.now(UTC)
    assert visits(since=now - timedelta(hours=1)) == ["Visited Sapporo."]


def test_a_newer_statement_ranks_before_the_one_it_updates(make_memory, user):
    s = Scope(user)
    plain = make_memory(options={"pgvector_supersede": 0.0})
    plain.write(s, ["I moved to Porto for a new job.", "I live in Lisbon, near the river."],
                occurred_at=["2024-06-01", "2021-03-01"])
    plain.write(s, ["My sister is a nurse.", "I play the cello on weekends.", "Our dog is called Biscuit."])
    query = "Where do I live?"
    before = [h.text for h in plain.read(s, query, Budget(k=3)).hits]
    assert before[0] == "I live in Lisbon, near the river."  # the older statement matches the question better
    updated = make_memory(options={"pgvector_supersede": 0.3})
    hits = updated.read(s, query, Budget(k=3)).hits
    assert [h.text for h in hits[:2]] == ["I moved to Porto for a new job.", "I live in Lisbon, near the river."]
    assert [h.item.occurred_at.year for h in hits[:2]] == [2024, 2021]  # both carry their dates
    assert hits[0].score > hits[1].score


def test_the_relevance_floor_returns_nothing_for_an_unrelated_query(make_memory, user):
    s = Scope(user)
    floored = make_memory(options={"relevance_floor": 0.3})
    floored.write(s, ["Alice's flight to Oslo leaves at 9:40 on Friday.", "The invoice for March is paid."])
    assert floored.read(s, "the quadratic formula for polynomial roots").hits == ()
    assert [h.text for h in floored.read(s, "When does the flight to Oslo leave?").hits][0].startswith("Alice's")
    # A read may lower (or raise) the floor it gets.
    assert floored.read(s, "the quadratic formula for polynomial roots", min_relevance=-1).hits
    hit = floored.read(s, "flight to Oslo").hits[0]
    assert 0.3 <= hit.relevance <= 1
    with pytest.raises(InvalidInput, match="min_relevance"):
        floored.read(s, "flight", min_relevance=2)


def test_reindexing_changes_the_index_and_loses_nothing(make_memory, user):
    s = Scope(user)
    old = make_memory(options={"pgvector_index": ""})
    turns = [("Kate", "I finally booked the cabin for February!"), ("Emi", "Nice, which lake?"),
             ("Kate", "Lake Tahoe, we're going skiing."), ("Emi", "Bring me back a souvenir.")]
    written = old.write(s, [t for _, t in turns], [{"speaker": who} for who, _ in turns],
                        occurred_at=["2024-01-10T10:00", "2024-01-10T10:01", "2024-01-10T10:02", "2024-01-10T10:03"])
    old.write(s, "A plain fact with no speaker.")

    def index():
        with old.store.scoped(s) as db:
            rows = db.execute("SELECT item_id, embedding, tsv::text FROM pgvector_items WHERE user_id = %s",
                              (user,)).fetchall()
        return {i: (v.to_numpy().astype(np.float32), tsv) for i, v, tsv in rows}

    def same(a, b):  # a batch embeds with other padding than a single text: equal to rounding
        return a[1] == b[1] and float(a[0] @ b[0]) > 0.999

    before, items_before = index(), old.items(s, limit=10)
    new = make_memory(options={"pgvector_index": "speaker,date,previous"})
    assert new.reindex(s) == 5
    after, items_after = index(), new.items(s, limit=10)
    assert items_after == items_before  # the items, their text and times: untouched
    assert set(after) == set(before)
    changed = {i for i in after if not same(after[i], before[i])}
    assert changed == {it.id for it in written}  # only the turns are indexed differently
    with new.store.scoped(s) as db:
        tsv = db.execute("SELECT tsv::text FROM pgvector_items WHERE item_id = %s", (written[1].id,)).fetchone()[0]
    assert "'emi'" in tsv and "'cabin'" in tsv  # its speaker, and the turn before it
    assert "'wednesday'" in tsv  # and its date
    hits = new.read(s, "Where is Kate going skiing?", Budget(k=2)).hits
    assert hits[0].text == "Lake Tahoe, we're going skiing."  # a read returns the stored text
    assert new.reindex(s) == 5  # again: idempotent
    assert all(same(a, after[i]) for i, a in index().items())
