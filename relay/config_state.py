"""The database's identity and its configuration version (table `relay_state`, one row).

Every configuration edit bumps `config_version` in its own transaction, so a process that holds version N
knows it must reload when it reads more than N — whatever the clocks of the hosts that wrote. The deployment
id, made with the database, prefixes every Redis key: a recreated database never reads an old Redis."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlmodel import Session

from relay.models import Channel, RelayState
from relay.secrets import CHECK_PLAINTEXT, PREFIX, SecretBox, SecretKeyError


@dataclass(frozen=True)
class StateRow:
    deployment_id: str
    config_version: int


def bump(session: Session) -> int:
    """Part of the caller's transaction: the edit and the new version commit together. The new version, which the
    rows the edit writes carry (relay.catalog reloads only rows above the version it holds). The row lock this
    takes is held until the commit, so versions are committed in the order they were handed out."""
    return int(session.execute(update(RelayState).where(RelayState.id == 1)
                               .values(config_version=RelayState.config_version + 1)
                               .returning(RelayState.config_version)).scalar_one())


def read(engine: Engine) -> StateRow:
    with Session(engine) as s:
        row = s.execute(select(RelayState.deployment_id, RelayState.config_version)
                        .where(RelayState.id == 1)).one()
    return StateRow(row[0], int(row[1]))


def version(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.execute(select(RelayState.config_version).where(RelayState.id == 1)).scalar_one())


def check_secret_key(engine: Engine, box: SecretBox) -> None:
    """Refuses a key that is not this database's. A database that remembers none yet (a new one) remembers
    this one — unless a secret stored earlier does not decrypt with it."""
    with Session(engine) as s:
        stored = s.execute(select(RelayState.secret_check).where(RelayState.id == 1)).scalar_one()
        if stored is None:
            sample = s.execute(select(Channel.api_key).where(Channel.api_key.like(PREFIX + "%")).limit(1)).scalar()
            if sample is not None:
                box.decrypt(sample)  # raises SecretKeyError when it was encrypted with another key
            # Only if still unset: of two processes starting at once with different keys, one wins, the other
            # is refused below.
            s.execute(update(RelayState).where(RelayState.id == 1, RelayState.secret_check.is_(None))
                      .values(secret_check=box.encrypt(CHECK_PLAINTEXT)))
            s.commit()
            stored = s.execute(select(RelayState.secret_check).where(RelayState.id == 1)).scalar_one()
    try:
        ok = box.decrypt(stored) == CHECK_PLAINTEXT
    except SecretKeyError:
        ok = False
    if not ok:
        raise SecretKeyError("RELAY_SECRET_KEY is not the key this database's upstream secrets were encrypted "
                             "with; start the relay with that key (a list 'new,old' rotates to a new one).")
