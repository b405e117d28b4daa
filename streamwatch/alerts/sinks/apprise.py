"""The long tail of notification services (email, Telegram, PagerDuty, ntfy, …) through the
Apprise library: `pip install 'streamwatch[apprise]'`. The sink's `url` holds one Apprise URL,
or several separated by spaces. Apprise reports only success or failure, so every failure is
retried until `max_attempts`."""

from __future__ import annotations

from pydantic import SecretStr

from streamwatch.alerts.sinks import Alert, Delivery, Sink, SinkSpec, clamp, truncate

__all__ = ["AppriseMissing", "AppriseSink"]


class AppriseMissing(RuntimeError):
    """The apprise extra is not installed."""


class AppriseSink:
    kind = "apprise"

    def __init__(
        self,
        *,
        name: str,
        url: SecretStr,
        max_in_flight: int = 1,
        max_attempts: int = 8,
    ) -> None:
        try:
            import apprise
        except ImportError:
            raise AppriseMissing(
                f"sink {name!r} needs Apprise: pip install 'streamwatch[apprise]'"
            ) from None
        self._apprise = apprise
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self._client = apprise.Apprise()
        for target in url.get_secret_value().split():
            if not self._client.add(target):
                raise ValueError(f"sink {name!r}: Apprise does not understand one of its URLs")

    @classmethod
    def build(cls, spec: SinkSpec) -> Sink:
        return cls(
            name=spec.name,
            url=spec.url,
            max_in_flight=spec.max_in_flight,
            max_attempts=spec.max_attempts,
        )

    async def deliver(self, alerts: list[Alert]) -> Delivery:
        alerts = [Alert(a.alert_id, clamp(a.event)) for a in alerts]
        first = alerts[0].event
        types = self._apprise.NotifyType
        kind = (
            types.SUCCESS
            if first.resolved
            else {"critical": types.FAILURE, "warning": types.WARNING}.get(
                first.severity, types.INFO
            )
        )
        title = first.title if len(alerts) == 1 else f"{len(alerts)} alerts: {first.title}"
        body = "\n\n".join(
            f"{a.event.title}\n{a.event.text}"
            + (f"\n{a.event.clip_url}" if a.event.clip_url else "")
            + f"\n(alert {a.alert_id})"
            for a in alerts
        )
        ok = await self._client.async_notify(
            body=truncate(body, 20_000), title=title, notify_type=kind
        )
        return Delivery(bool(ok), retry=not ok, detail="" if ok else "apprise reported failure")
