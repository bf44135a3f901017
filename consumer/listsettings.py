"""What a destination's list settings in Campaign Monitor mean for the sync: whether it may
write to the list at all (`ListCheck.held_reason`), what to warn about, and the types of the
mapped custom fields (the import rows' values are coerced to them, `consumer.rows`).

Read once per destination when its flusher starts (`read_list_check`, before its first write:
the list details and, when it maps custom fields, the list's custom fields) and by
``cmsync check-config --online``; both judge the answers with `check_list`. Not refreshed while
the service runs: a list changed in Campaign Monitor counts from the next start.

A destination is held (sends nothing, `cmsync_destination_up` 0) when:

- ``removal = "unsubscribe"`` and the list's ``UnsubscribeSetting`` is ``AllClientLists``:
  each removal would unsubscribe the person from every list of the client (and suppress
  them), unless the destination says ``unsubscribe_all_client_lists = true``;
- a mapped custom field key is not a field of the list (keys compared as Campaign Monitor
  compares them, `consumer.fieldtypes.key_of`): Campaign Monitor would drop its values without
  an error;
- Campaign Monitor refused to answer for a reason retrying cannot fix (`CampaignMonitorError`
  that the gateway hands back: its code is named).

Warned about (the destination goes on): a ``ConfirmedOptIn`` list (adds send confirmation
emails and stay Unconfirmed until the person confirms), and a custom fields listing that cannot
be typed (its values are then sent as they are, unchecked, as before types were read).

Messages name lists, keys and settings (configuration), never an address or a value.

`check_list` is pure; `read_list_check` only awaits the two reads it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from consumer.campaign_monitor.errors import DESCRIPTIONS, RecordRejected, RequestInvalid
from consumer.destinations import Destination
from consumer.fieldtypes import FieldType, field_types, key_of, missing_keys

__all__ = ["ListCheck", "ListReader", "check_list", "read_list_check", "refused"]


@dataclass(frozen=True, slots=True)
class ListCheck:
    """The verdict on one destination's list. `types` are the list's fields by
    `consumer.fieldtypes.key_of` their key, or None when they were not read or could not be
    typed (values are then sent as they are)."""

    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    types: Mapping[str, FieldType] | None = None
    unsubscribe_setting: str | None = None
    confirmed_opt_in: bool | None = None

    @property
    def held_reason(self) -> str | None:
        """Why nothing may be sent to the list (no personal data), or None."""
        return "; ".join(self.problems) or None


class ListReader(Protocol):
    """The two reads (`consumer.gateway.ApiGateway`, rate-limited and retried)."""

    async def list_details(self, list_id: str, *, destination: str) -> dict[str, Any]: ...

    async def custom_fields(self, list_id: str, *, destination: str) -> list[dict[str, Any]]: ...


def check_list(
    destination: Destination,
    details: Mapping[str, Any],
    fields: Sequence[Mapping[str, Any]] | None,
) -> ListCheck:
    """Judge the list details (``GET /lists/{id}.json``) and custom fields listing
    (``GET /lists/{id}/customfields.json``; None: not read, no key is checked) for
    `destination` (module docstring: the rules)."""
    problems: list[str] = []
    warnings: list[str] = []
    setting = details.get("UnsubscribeSetting")
    setting_text = setting if isinstance(setting, str) else None
    if (
        destination.removal == "unsubscribe"
        and setting_text is not None
        and setting_text.casefold() == "allclientlists"
        and not destination.unsubscribe_all_client_lists
    ):
        problems.append(
            f"list {destination.list_id} has UnsubscribeSetting AllClientLists, so removal = "
            '"unsubscribe" would unsubscribe each removed member from every list of the client; '
            'use removal = "delete", or set unsubscribe_all_client_lists = true to accept that'
        )
    confirmed = details.get("ConfirmedOptIn")
    confirmed_opt_in = confirmed if isinstance(confirmed, bool) else None
    if confirmed_opt_in:
        warnings.append(
            f"list {destination.list_id} is ConfirmedOptIn: adds send confirmation emails and "
            "stay Unconfirmed until the person confirms"
        )
    types: dict[str, FieldType] | None = None
    mapped = [key for key, _ in destination.custom_fields]
    if fields is not None:
        try:
            types = field_types(fields)
            missing = missing_keys(mapped, types)
        except ValueError as exc:
            if mapped:
                warnings.append(
                    f"the custom fields of list {destination.list_id} cannot be typed ({exc}): "
                    "their values are sent as they are, unchecked"
                )
            keys = {key_of(f["Key"]) for f in fields if isinstance(f.get("Key"), str)}
            missing = [key for key in mapped if key_of(key) not in keys]
        if missing:
            named = ", ".join(f'"{key}"' for key in missing)
            problems.append(
                f"list {destination.list_id} has no custom field {named} (mapped in "
                "custom_fields; Campaign Monitor would drop the values): create the field in "
                "the list or remove the mapping"
            )
    return ListCheck(
        problems=tuple(problems),
        warnings=tuple(warnings),
        types=types,
        unsubscribe_setting=setting_text,
        confirmed_opt_in=confirmed_opt_in,
    )


def refused(code: int | None, status: int) -> str:
    """The problem of a read Campaign Monitor refused (no secret: code and description)."""
    description = DESCRIPTIONS.get(code, "") if code is not None else ""
    what = f"code {code}" + (f", {description}" if description else "")
    return f"Campaign Monitor refused to read the list settings (HTTP {status}, {what})"


async def read_list_check(reader: ListReader, destination: Destination) -> ListCheck:
    """Read the list details and (when the destination maps custom fields) the custom fields
    through `reader`, and judge them with `check_list`. A read Campaign Monitor refuses for a
    reason retrying cannot fix holds the destination (its code named); `reader` retries the
    others (and reports a bad key or list as a stall meanwhile)."""
    name = destination.name
    try:
        details = await reader.list_details(destination.list_id, destination=name)
        fields = None
        if destination.custom_fields:
            fields = await reader.custom_fields(destination.list_id, destination=name)
    except (RecordRejected, RequestInvalid) as exc:
        return ListCheck(problems=(refused(exc.code, exc.status),))
    return check_list(destination, details, fields)
