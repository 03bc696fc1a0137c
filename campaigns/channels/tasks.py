"""The call-centre channel: a task list in the database for staff follow-up.

Creating the task runs in the worker's transaction with the message's outcome, and
the task is unique per message: a retried batch never creates a second task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaigns.channels import Channel, Outcome, Outgoing, Result
from service.audit import record as audit
from service.errors import Conflict, NotFound

_INSERT = text(
    """
    INSERT INTO call_tasks (message_id, member_id, campaign_id, subject, script, phone)
    SELECT * FROM unnest(CAST(:message_ids AS bigint[]), CAST(:member_ids AS bigint[]),
                         CAST(:campaign_ids AS bigint[]), CAST(:subjects AS text[]),
                         CAST(:scripts AS text[]), CAST(:phones AS text[]))
    ON CONFLICT (message_id) DO NOTHING
    """
)
_IDS = text("SELECT message_id, id FROM call_tasks WHERE message_id = ANY(:ids)")


class CallCentreChannel(Channel):
    in_transaction = True

    def send_many(
        self, messages: Sequence[Outgoing], session: Session | None = None
    ) -> list[Outcome]:
        if not messages:
            return []
        if session is None:
            raise RuntimeError("the call-centre channel writes in the worker's transaction")
        session.execute(
            _INSERT,
            {
                "message_ids": [m.message_id for m in messages],
                "member_ids": [m.member_id for m in messages],
                "campaign_ids": [m.campaign_id for m in messages],
                "subjects": [m.subject for m in messages],
                "scripts": [m.body for m in messages],
                "phones": [m.to for m in messages],
            },
        )
        ids: dict[int, int] = dict(
            session.execute(_IDS, {"ids": [m.message_id for m in messages]}).all()
        )
        return [
            Outcome(m.message_id, Result.SENT, provider_id=f"task-{ids.get(m.message_id)}")
            for m in messages
        ]


# --- the task list (service functions behind /v1/tasks) --------------------------------

OUTCOMES = ("reached", "no_answer", "declined", "wrong_number")

_TASK_COLUMNS = """
    t.id, t.message_id, m.external_id AS member_id, m.name AS member_name, t.phone,
    t.campaign_id, t.subject, t.script, t.status, t.claimed_by, t.claimed_at, t.closed_at,
    t.outcome, t.note, t.created_at
"""
_GET = text(
    f"SELECT {_TASK_COLUMNS} FROM call_tasks t JOIN members m ON m.id = t.member_id "  # noqa: S608
    "WHERE t.id = :id"
)
_CLAIM = text(
    """
    UPDATE call_tasks SET status = 'claimed', claimed_by = :actor, claimed_at = now()
    WHERE id = :id AND status = 'open'
    RETURNING id
    """
)
_CLOSE = text(
    """
    UPDATE call_tasks SET status = 'closed', closed_at = now(), outcome = :outcome, note = :note
    WHERE id = :id AND status = 'claimed' AND (claimed_by = :actor OR :admin)
    RETURNING id
    """
)
_RELEASE = text(
    """
    UPDATE call_tasks SET status = 'open', claimed_by = NULL, claimed_at = NULL
    WHERE id = :id AND status = 'claimed' AND (claimed_by = :actor OR :admin)
    RETURNING id
    """
)


def get_task(session: Session, task_id: int) -> dict[str, Any]:
    row = session.execute(_GET, {"id": task_id}).mappings().first()
    if row is None:
        raise NotFound(f"task {task_id} does not exist")
    return dict(row)


def list_tasks(
    session: Session,
    *,
    status: str | None = None,
    claimed_by: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Tasks oldest first (the call-centre works the queue in order), keyset by id."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit + 1}
    if status is not None:
        where.append("t.status = :status")
        params["status"] = status
    if claimed_by is not None:
        where.append("t.claimed_by = :claimed_by")
        params["claimed_by"] = claimed_by
    if cursor is not None:
        where.append("t.id > :cursor")
        params["cursor"] = cursor
    rows = (
        session.execute(
            text(
                f"SELECT {_TASK_COLUMNS} FROM call_tasks t "  # noqa: S608 - fixed fragments
                f"JOIN members m ON m.id = t.member_id WHERE {' AND '.join(where)} "
                "ORDER BY t.id LIMIT :limit"
            ),
            params,
        )
        .mappings()
        .all()
    )
    page = [dict(r) for r in rows[:limit]]
    return page, (page[-1]["id"] if len(rows) > limit else None)


def claim_task(session: Session, task_id: int, *, actor: str) -> dict[str, Any]:
    """Take an open task. Claiming one's own task again is a no-op; another's is a 409."""
    if session.execute(_CLAIM, {"id": task_id, "actor": actor}).first() is None:
        task = get_task(session, task_id)
        if not (task["status"] == "claimed" and task["claimed_by"] == actor):
            raise Conflict(
                f"task {task_id} is {task['status']}"
                + (f" by {task['claimed_by']}" if task["claimed_by"] else ""),
                errors={"status": [task["status"]]},
            )
        return task
    audit(session, actor, "task.claimed", "call_task", str(task_id))
    return get_task(session, task_id)


def close_task(
    session: Session,
    task_id: int,
    *,
    actor: str,
    outcome: str,
    note: str | None = None,
    admin: bool = False,
) -> dict[str, Any]:
    """Close a task one has claimed with its outcome; repeating the same close is a no-op."""
    params = {"id": task_id, "actor": actor, "outcome": outcome, "note": note, "admin": admin}
    if session.execute(_CLOSE, params).first() is None:
        task = get_task(session, task_id)
        if task["status"] == "closed" and task["outcome"] == outcome:
            return task
        if task["status"] == "open":
            detail = f"task {task_id} must be claimed before it is closed"
        elif task["status"] == "claimed":
            detail = f"task {task_id} is claimed by {task['claimed_by']}"
        else:
            detail = f"task {task_id} is already closed ({task['outcome']})"
        raise Conflict(detail, errors={"status": [task["status"]]})
    audit(session, actor, "task.closed", "call_task", str(task_id), {"outcome": outcome})
    return get_task(session, task_id)


def release_task(
    session: Session, task_id: int, *, actor: str, admin: bool = False
) -> dict[str, Any]:
    """Give a claimed task back to the queue."""
    if session.execute(_RELEASE, {"id": task_id, "actor": actor, "admin": admin}).first() is None:
        task = get_task(session, task_id)
        if task["status"] == "open":
            return task
        raise Conflict(f"task {task_id} is {task['status']}", errors={"status": [task["status"]]})
    audit(session, actor, "task.released", "call_task", str(task_id))
    return get_task(session, task_id)
