"""Driver base: declarative SCPI properties, validators, error checking and the registry.

One job: let a driver declare an instrument in one line per property, the way PyMeasure
and QCoDeS do (``control`` / ``measurement`` / ``setting`` with validators), and give every
driver the same behaviour: values validated before anything is sent, replies parsed
robustly, the instrument's error queue checked after set commands, typed errors; plus a
registry (decorator + ``labdaq.drivers`` entry points) that maps ``*IDN?`` to a driver
(opening and identifying an instrument is drivers/opener.py).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from .errors import (
    GarbledReply,
    InstrumentReportedError,
    InstrumentValueError,
    UnknownInstrument,
)
from .transport import Transport

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "labdaq.drivers"

# ---------------------------------------------------------------------------------------
# Validators: objects, so safety code can read the limits (validator.min / .max / .values)
# ---------------------------------------------------------------------------------------


class Validator:
    """Checks (and possibly adjusts) a value; raises ValueError with a readable reason."""

    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] | None = None

    def __call__(self, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


class strict_range(Validator):  # noqa: N801 - PyMeasure naming, reads like a function
    """``min <= value <= max`` or ValueError."""

    min: float
    max: float

    def __init__(self, minimum: float, maximum: float) -> None:
        if minimum > maximum:
            raise ValueError(f"empty range [{minimum}, {maximum}]")
        self.min = float(minimum)
        self.max = float(maximum)

    def __call__(self, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if math.isnan(number) or not self.min <= number <= self.max:
            raise ValueError(f"{value!r} is outside [{self.min:g}, {self.max:g}]")
        return number

    def describe(self) -> str:
        return f"a number in [{self.min:g}, {self.max:g}]"

    def __repr__(self) -> str:
        return f"strict_range({self.min:g}, {self.max:g})"


class truncated_range(strict_range):  # noqa: N801
    """Clamp into ``[min, max]`` instead of rejecting (for harmless settings only)."""

    def __call__(self, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if math.isnan(number):
            raise ValueError("NaN is not a valid setting")
        return min(max(number, self.min), self.max)

    def __repr__(self) -> str:
        return f"truncated_range({self.min:g}, {self.max:g})"


class strict_discrete_set(Validator):  # noqa: N801
    """Value must be one of ``values`` (strings compared case-insensitively)."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.values = tuple(values)
        numbers = [v for v in self.values if isinstance(v, int | float)
                   and not isinstance(v, bool)]
        self.min = min(numbers) if numbers else None
        self.max = max(numbers) if numbers else None

    def __call__(self, value: Any) -> Any:
        assert self.values is not None
        for allowed in self.values:
            if isinstance(allowed, str) and isinstance(value, str):
                if allowed.upper() == value.upper():
                    return allowed
            elif allowed == value and type(allowed) is type(value):
                return allowed
        for allowed in self.values:  # 1 == 1.0, but True must not pass for 1
            if not isinstance(value, bool) and not isinstance(allowed, str) and allowed == value:
                return allowed
        raise ValueError(f"{value!r} is not one of {list(self.values)!r}")

    def describe(self) -> str:
        return f"one of {list(self.values or ())!r}"

    def __repr__(self) -> str:
        return f"strict_discrete_set({list(self.values or ())!r})"


# ---------------------------------------------------------------------------------------
# Property descriptors
# ---------------------------------------------------------------------------------------


class _ScpiProperty:
    """Shared machinery of control / measurement / setting."""

    def __init__(
        self,
        get_cmd: str | None,
        set_cmd: str | None,
        doc: str = "",
        *,
        validator: Validator | type[Validator] | None = None,
        values: Sequence[Any] | Mapping[Any, Any] | None = None,
        map_values: bool = False,
        cast: Callable[[str], Any] = float,
        check_errors: bool = True,
        get_process: Callable[[Any], Any] | None = None,
        set_process: Callable[[Any], Any] | None = None,
    ) -> None:
        self.get_cmd = get_cmd
        self.set_cmd = set_cmd
        self.__doc__ = doc
        self.values = values
        self.map_values = map_values
        if isinstance(validator, type) and issubclass(validator, Validator):
            # PyMeasure spelling: validator=strict_range, values=(min, max).
            if values is None:
                raise TypeError(f"{validator.__name__} as a class needs values=")
            if issubclass(validator, strict_range):
                low, high = values  # type: ignore[misc]
                validator = validator(low, high)
            else:
                keys = list(values.keys()) if isinstance(values, Mapping) else list(values)
                validator = validator(keys)  # type: ignore[call-arg]
        if validator is None and values is not None:
            keys = list(values.keys()) if isinstance(values, Mapping) else list(values)
            validator = strict_discrete_set(keys)
        if map_values and not isinstance(values, Mapping):
            raise TypeError("map_values=True needs values={user_value: instrument_value}")
        self.validator = validator
        self.cast = cast
        self.check_errors = check_errors
        self.get_process = get_process
        self.set_process = set_process
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        if self.get_cmd is None:
            raise AttributeError(f"{self.name} is write-only")
        return obj._get_property(self)

    def __set__(self, obj: Any, value: Any) -> None:
        if self.set_cmd is None:
            raise AttributeError(f"{self.name} is read-only")
        obj._set_property(self, value)

    # -- conversion helpers used by Instrument ---------------------------------------------
    def format_command(self, value: Any) -> str:
        assert self.set_cmd is not None
        if self.map_values:
            assert isinstance(self.values, Mapping)
            value = self.values[value]
        if self.set_process is not None:
            value = self.set_process(value)
        if "{" in self.set_cmd:
            return self.set_cmd.format(value)
        return self.set_cmd % value

    def parse_reply(self, reply: str) -> Any:
        text = reply.strip()
        value: Any = self.cast(text)
        if self.map_values:
            assert isinstance(self.values, Mapping)
            for user, inst in self.values.items():
                if inst == value or (isinstance(inst, str) and isinstance(value, str)
                                     and inst.upper() == value.upper()):
                    return user
            raise ValueError(f"{text!r} is not one of {list(self.values.values())!r}")
        if self.get_process is not None:
            value = self.get_process(value)
        return value


class control(_ScpiProperty):  # noqa: N801 - declarative API reads like PyMeasure
    """A readable and writable instrument property (``get_cmd`` query, ``set_cmd``)."""

    def __init__(self, get_cmd: str, set_cmd: str, doc: str = "", **kwargs: Any) -> None:
        super().__init__(get_cmd, set_cmd, doc, **kwargs)


class measurement(_ScpiProperty):  # noqa: N801
    """A read-only value (``get_cmd`` query)."""

    def __init__(self, get_cmd: str, doc: str = "", **kwargs: Any) -> None:
        super().__init__(get_cmd, None, doc, **kwargs)


class setting(_ScpiProperty):  # noqa: N801
    """A write-only value (``set_cmd``)."""

    def __init__(self, set_cmd: str, doc: str = "", **kwargs: Any) -> None:
        super().__init__(None, set_cmd, doc, **kwargs)


# ---------------------------------------------------------------------------------------
# Instrument
# ---------------------------------------------------------------------------------------

_ERROR_REPLY = re.compile(r'^\s*([+-]?\d+)\s*(?:,\s*"?(.*?)"?\s*)?$')


def parse_error_reply(reply: str) -> tuple[int, str]:
    """``-113,"Undefined header"`` / ``+0,"No error"`` / ``0, No Error`` -> (code, text)."""
    m = _ERROR_REPLY.match(reply)
    if m is None:
        raise ValueError(f"not an error-queue entry: {reply!r}")
    return int(m.group(1)), (m.group(2) or "").strip()


class Instrument:
    """Base for drivers: a Transport, a name, declared properties and error checking.

    Per-instance validator overrides (``set_validator``) let one class cover models with
    different limits (2450 vs 2460); ``validator(name)`` exposes the limits in force.
    """

    idn_patterns: ClassVar[list[str]] = []
    driver_name: ClassVar[str] = ""
    error_query: ClassVar[str] = ":SYST:ERR?"
    max_errors_drained: ClassVar[int] = 32

    def __init__(self, transport: Transport, name: str | None = None, *,
                 idn: str | None = None) -> None:
        self.transport = transport
        self.name = name or transport.resource
        self._idn = idn
        self._validators: dict[str, Validator | None] = {}
        self._lock = threading.RLock()  # a set and its error check stay together
        self._async_lock = threading.Lock()  # one aquery at a time on the loop's thread

    # -- raw I/O ---------------------------------------------------------------------
    def reconnect(self) -> None:
        """Drop the link and open it again (a lost instrument being tried again)."""
        self.transport.reconnect()

    def mark_next_send(self) -> None:
        """Ask the transport to stamp when the next command goes out (role interfaces)."""
        self.transport.mark_next_send()

    def marked_send_s(self) -> float:
        """perf_counter of the command after :meth:`mark_next_send` (NaN: none yet)."""
        return float(self.transport.marked_send_s)

    def write(self, command: str) -> None:
        with self._lock:
            self.transport.write(command)

    def query(self, command: str) -> str:
        with self._lock:
            return self.transport.query(command)

    def query_raw(self, command: str) -> bytes:
        """:meth:`query` returning undecoded bytes (binary block replies)."""
        with self._lock:
            return self.transport.query_raw(command)

    async def aquery(self, command: str, *, raw: bool = False,
                     repeatable: bool = False) -> Any:
        """:meth:`query` without leaving the event loop's thread, where the transport can
        (``Transport.aquery``: a socket session, an idempotent query); None when not —
        the instrument is busy in another thread, or the exchange failed — and the
        caller asks through :meth:`query` in the instrument's worker thread instead.
        ``raw=True``: the reply's bytes, as :meth:`query_raw`. ``repeatable``: a program
        message that is not a pure query but may be sent again after None (the
        transport's ``aquery_raw``)."""
        fast = getattr(self.transport, "aquery_raw" if raw else "aquery", None)
        # The RLock alone would let a second coroutine of the loop's own thread in while
        # the first awaits its reply: the plain lock keeps the loop thread to one exchange.
        if fast is None or not self._async_lock.acquire(blocking=False):
            return None
        try:
            if not self._lock.acquire(blocking=False):
                return None
            try:
                return await fast(command, repeatable=repeatable)
            finally:
                self._lock.release()
        finally:
            self._async_lock.release()

    def query_floats(self, command: str) -> list[float]:
        """Several numbers in one reply, separated by ``,`` or ``;``."""
        reply = self.query(command)
        parts = [p for p in re.split(r"[;,]", reply) if p.strip()]
        if not parts:
            raise GarbledReply(reply=reply, instrument=self.name, command=command,
                               expected="numbers")
        return [self._to_float(p, command, whole=reply) for p in parts]

    def _to_float(self, text: str, command: str, whole: str | None = None) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise GarbledReply(reply=whole if whole is not None else text,
                               instrument=self.name, command=command,
                               expected="a number") from None
        return value

    def write_checked(self, command: str) -> None:
        """Write a set command and check the error queue afterwards."""
        with self._lock:
            self.write(command)
            self.check_errors(command)

    # -- error checking ----------------------------------------------------------------
    def check_errors(self, command: str = "") -> None:
        """Read the error queue; raise InstrumentReportedError for the first entry.

        Drains the queue so the next check starts clean; subclasses whose instruments
        only have ESR (e.g. Hioki) override this with ``*ESR?``.
        """
        errors: list[tuple[int, str]] = []
        with self._lock:
            for _ in range(self.max_errors_drained):
                reply = self.query(self.error_query)
                try:
                    code, text = parse_error_reply(reply)
                except ValueError:
                    raise GarbledReply(reply=reply, instrument=self.name,
                                       command=self.error_query,
                                       expected='an error entry like 0,"No error"') from None
                if code == 0:
                    break
                errors.append((code, text))
        if errors:
            code, text = errors[0]
            raise InstrumentReportedError(
                code=code, text=text, instrument=self.name, command=command,
                others=errors[1:],
            )

    # -- validators -------------------------------------------------------------------
    def _descriptor(self, name: str) -> _ScpiProperty:
        prop = getattr(type(self), name, None)
        if not isinstance(prop, _ScpiProperty):
            raise AttributeError(f"{type(self).__name__} has no SCPI property {name!r}")
        return prop

    def validator(self, name: str) -> Validator | None:
        """The validator in force for property ``name`` (instance override or class)."""
        if name in self._validators:
            return self._validators[name]
        return self._descriptor(name).validator

    def set_validator(self, name: str, validator: Validator | None) -> None:
        self._descriptor(name)
        self._validators[name] = validator

    def validate(self, name: str, value: Any) -> Any:
        """Validated value or InstrumentValueError (nothing is sent)."""
        prop = self._descriptor(name)
        validator = self.validator(name)
        if validator is None:
            return value
        try:
            return validator(value)
        except ValueError as exc:
            raise InstrumentValueError(
                f"{name} = {value!r} rejected: {exc}; nothing was sent",
                instrument=self.name, command=prop.set_cmd or "",
                expected=validator.describe(),
            ) from None

    def command_for(self, name: str, value: Any) -> str:
        """The exact set command for ``name = value`` after validation (not sent)."""
        prop = self._descriptor(name)
        return prop.format_command(self.validate(name, value))

    def set(self, name: str, value: Any, *, check_errors: bool | None = None) -> None:
        """Set property ``name``; ``check_errors`` overrides the declaration."""
        prop = self._descriptor(name)
        command = self.command_for(name, value)
        check = prop.check_errors if check_errors is None else check_errors
        with self._lock:
            self.write(command)
            if check:
                self.check_errors(command)

    def _set_property(self, prop: _ScpiProperty, value: Any) -> None:
        self.set(prop.name, value)

    def _get_property(self, prop: _ScpiProperty) -> Any:
        assert prop.get_cmd is not None
        reply = self.query(prop.get_cmd)
        try:
            return prop.parse_reply(reply)
        except (ValueError, TypeError, KeyError):
            raise GarbledReply(reply=reply, instrument=self.name, command=prop.get_cmd,
                               expected=f"a {getattr(prop.cast, '__name__', 'value')} "
                                        f"for {prop.name}") from None

    # -- common commands --------------------------------------------------------------------
    @property
    def idn(self) -> str:
        """``*IDN?`` (queried once, then cached)."""
        if self._idn is None:
            self._idn = self.query("*IDN?")
        return self._idn

    def reset(self) -> None:
        """``*RST`` then ``*CLS``: defaults, empty error queue."""
        with self._lock:
            self.write("*RST")
            self.write("*CLS")

    def clear(self) -> None:
        """``*CLS``: clear the error queue and event registers."""
        self.write("*CLS")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Instrument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

InstrumentT = TypeVar("InstrumentT", bound=type[Instrument])

_registry: dict[str, type[Instrument]] = {}
_registry_lock = threading.Lock()
_entry_points_loaded = False


def register_driver(name: str) -> Callable[[InstrumentT], InstrumentT]:
    """Class decorator: make a driver findable by ``name`` and by its ``idn_patterns``."""

    def decorate(cls: InstrumentT) -> InstrumentT:
        with _registry_lock:
            existing = _registry.get(name)
            if existing is not None and existing is not cls and (
                existing.__module__, existing.__qualname__) != (cls.__module__,
                                                                cls.__qualname__):
                raise ValueError(f"driver name {name!r} already used by {existing!r}")
            _registry[name] = cls
        cls.driver_name = name
        return cls

    return decorate


def unregister_driver(name: str) -> None:
    """Forget a registered driver (tests, or a lab replacing a shipped driver)."""
    with _registry_lock:
        _registry.pop(name, None)


def load_entry_point_drivers(*, force: bool = False) -> dict[str, type[Instrument]]:
    """Import every driver in the ``labdaq.drivers`` entry-point group (once per process).

    A broken third-party driver is logged and skipped; it must not take the lab down.
    """
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return registered_drivers()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception:
            log.exception("cannot load driver entry point %s = %s", ep.name, ep.value)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Instrument)):
            log.error("entry point %s = %s is not an Instrument subclass", ep.name, ep.value)
            continue
        with _registry_lock:
            _registry.setdefault(ep.name, cls)
        if not cls.driver_name:
            cls.driver_name = ep.name
    _entry_points_loaded = True
    return registered_drivers()


def registered_drivers() -> dict[str, type[Instrument]]:
    with _registry_lock:
        return dict(_registry)


def get_driver(name: str) -> type[Instrument]:
    drivers = registered_drivers()
    if name not in drivers:
        drivers = load_entry_point_drivers()
    try:
        return drivers[name]
    except KeyError:
        raise UnknownInstrument(f"no driver named {name!r}; known: {sorted(drivers)}",
                                instrument=name, expected="a registered driver") from None


def match_driver(idn: str) -> str:
    """Name of the registered driver whose ``idn_patterns`` match this ``*IDN?`` reply."""
    drivers = load_entry_point_drivers()
    for name, cls in drivers.items():
        for pattern in cls.idn_patterns:
            if re.search(pattern, idn, re.IGNORECASE):
                return name
    raise UnknownInstrument(f"no driver matches *IDN? {idn!r}; known: {sorted(drivers)}",
                            command="*IDN?", expected="a registered driver's idn_patterns")
