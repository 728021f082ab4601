"""What the API builds at start-up and keeps on ``app.state.api`` for its requests."""

from __future__ import annotations

from dataclasses import dataclass

from hub.hub import Hub
from hub.settings import Settings

from .db import Database
from .events import Publisher
from .security import Passwords
from .settings import ApiSettings
from .storage import AvatarStorage


@dataclass(slots=True)
class ApiContext:
    settings: Settings
    api_settings: ApiSettings
    hub: Hub
    db: Database
    passwords: Passwords
    avatars: AvatarStorage
    publisher: Publisher

    @property
    def disposable_domains(self) -> frozenset[str]:
        return frozenset(self.api_settings.disposable_email_domains)
