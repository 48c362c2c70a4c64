"""E1.31 (sACN) DMX lights: every universe of the rig changes in the same instant.

One :class:`SacnLights` drives all the rig's ``driver = "sacn"`` fixtures. Each
fixture occupies ``channels`` DMX slots from ``channel`` on in its
``universe``:

- the first slot is the dimmer: ``round(level * 255)``;
- the other slots get fixed values, ``options.extra["sacn_fixed_values"]``
  (comma-separated bytes for slots 2, 3, ... of every fixture; default
  ``"128"``: the studio's LED panels read slot 2 as colour temperature, 128 is
  mid-range); slots past that list are 0 (effects / strobe off).

Slots no fixture uses are 0. ``apply`` writes every universe and sends them in
one flush with E1.31 universe synchronisation (data packets carry the sync
universe, then one sync packet releases them together on receivers that
support it). While open, the last frame is re-sent every
``sacn_keepalive_s`` (sacn only sends on flush in manual-flush mode, and E1.31
receivers drop a source after 2.5 s of silence). ``close`` sends a blackout
(all 512 slots 0 on every universe), terminates the streams and releases the
socket.

Options (``DriverOptions.extra``, all strings):

``sacn_bind_address``  local address to send from (default ``0.0.0.0``)
``sacn_bind_port``     local port to send from (default 5568; packets always go
                       *to* port 5568, and a receiver on the same host needs the
                       sender on another port)
``sacn_destination``   unicast to this address (data *and* sync packets);
                       default: multicast to each universe's group
``sacn_sync_universe`` universe of the sync packets (default 63999; must not
                       be a data universe)
``sacn_source_name``   source name in the packets (default ``twinstudio``)
``sacn_priority``      E1.31 priority 0..200 (default 100)
``sacn_keepalive_s``   re-send period in seconds (default 1.0; 0: never)
``sacn_fixed_values``  see above
``sacn_universe_discovery``  ``1``/``0``: send universe discovery (broadcast;
                       default 1 with multicast, always 0 with unicast)

Not thread-safe for concurrent callers; one instance per rig.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass

import sacn
from sacn.sending.sender_socket_base import SenderSocketListener
from sacn.sending.sender_socket_udp import SenderSocketUDP

from rigs.drivers.base import DriverError, DriverOptions
from rigs.rigfile import LightSpec

log = logging.getLogger(__name__)

DRIVER = "sacn"
DMX_SLOTS = 512
#: E1.31 default port: sacn 1.11 always sends to it, whatever the sender's bind port
SACN_PORT = 5568


@dataclass(frozen=True)
class SacnSettings:
    """The driver's options, parsed from ``DriverOptions.extra``."""

    bind_address: str = "0.0.0.0"
    bind_port: int = SACN_PORT
    destination: str | None = None  # None: multicast
    sync_universe: int = 63999
    source_name: str = "twinstudio"
    priority: int = 100
    keepalive_s: float = 1.0
    fixed_values: tuple[int, ...] = (128,)
    universe_discovery: bool = True

    @classmethod
    def from_extra(cls, extra: dict[str, str]) -> SacnSettings:
        """Parse the ``sacn_*`` keys; raises DriverError naming a bad key."""

        def get(key: str, parse, default):
            if key not in extra:
                return default
            raw = extra[key]
            try:
                return parse(str(raw).strip())
            except ValueError as e:
                raise DriverError(f"option {key}={raw!r} is invalid: {e}", driver=DRIVER, transient=False) from None

        def ranged(lo: int, hi: int):
            def parse(s: str) -> int:
                v = int(s)
                if not lo <= v <= hi:
                    raise ValueError(f"must be in {lo}..{hi}")
                return v
            return parse

        def seconds(s: str) -> float:
            v = float(s)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError("must be a number of seconds >= 0")
            return v

        def flag(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be 1 or 0")

        def source_name(s: str) -> str:
            if len(s.encode("utf-8")) > 63:
                raise ValueError("at most 63 bytes")
            return s

        destination = extra.get("sacn_destination") or None
        discovery = get("sacn_universe_discovery", flag, True) and destination is None
        return cls(
            bind_address=extra.get("sacn_bind_address", cls.bind_address),
            bind_port=get("sacn_bind_port", ranged(0, 65535), cls.bind_port),
            destination=destination,
            sync_universe=get("sacn_sync_universe", ranged(1, 63999), cls.sync_universe),
            source_name=get("sacn_source_name", source_name, cls.source_name),
            priority=get("sacn_priority", ranged(0, 200), cls.priority),
            keepalive_s=get("sacn_keepalive_s", seconds, cls.keepalive_s),
            fixed_values=get("sacn_fixed_values",
                             lambda s: tuple(ranged(0, 255)(x) for x in s.split(",") if x.strip()),
                             cls.fixed_values),
            universe_discovery=discovery,
        )


class SacnLights:
    """All sACN fixtures of a rig; see the module docstring for the DMX mapping and options."""

    def __init__(self, lights: list[LightSpec], options: DriverOptions) -> None:
        self.lights = list(lights)
        self.options = options
        self.settings = SacnSettings.from_extra(dict(options.extra))
        for light in self.lights:
            if light.universe is None or light.channel is None:
                raise DriverError("an sacn light needs 'universe' and 'channel'", light=light.id, driver=DRIVER,
                                  transient=False)
            if light.channel + light.channels - 1 > DMX_SLOTS:
                raise DriverError(f"DMX channels {light.channel}..{light.channel + light.channels - 1} run past 512",
                                  light=light.id, driver=DRIVER, transient=False)
        #: the DMX universes the fixtures use, ascending
        self.universes: list[int] = sorted({light.universe for light in self.lights})  # type: ignore[misc]
        if self.settings.sync_universe in self.universes:
            raise DriverError(f"the sync universe {self.settings.sync_universe} is also a data universe "
                              "(set sacn_sync_universe to an unused one)", driver=DRIVER, transient=False)
        self._ids = {light.id for light in self.lights}
        self._levels: dict[str, float] = {}
        self._sender: sacn.sACNsender | None = None
        self._lock = threading.Lock()
        self._last_send = 0.0  # time.monotonic() of the last flush; 0: nothing sent yet
        self._keepalive_failing = False

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return self._sender is not None

    @property
    def levels(self) -> dict[str, float]:
        """The levels of the last successful ``apply`` (every fixture; {} before the first)."""
        return dict(self._levels)

    def dmx_frames(self, levels: dict[str, float]) -> dict[int, tuple[int, ...]]:
        """The 512-slot DMX data per universe for ``levels`` (0..1; missing ids: 0).

        Raises DriverError for an unknown light id or a level outside 0..1, before anything is sent.
        """
        for lid, level in levels.items():
            if lid not in self._ids:
                raise DriverError(f"unknown light id {lid!r} (this driver has: {', '.join(sorted(self._ids))})",
                                  light=str(lid), driver=DRIVER, transient=False)
            if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= level <= 1.0:
                raise DriverError(f"level {level!r} is outside 0..1", light=lid, driver=DRIVER, transient=False)
        frames = {u: [0] * DMX_SLOTS for u in self.universes}
        fixed = self.settings.fixed_values
        for light in self.lights:
            slots = frames[light.universe]  # type: ignore[index]
            first = light.channel - 1  # type: ignore[operator]
            slots[first] = int(round(float(levels.get(light.id, 0.0)) * 255))
            for k in range(1, light.channels):
                slots[first + k] = fixed[k - 1] if k - 1 < len(fixed) else 0
        return {u: tuple(s) for u, s in frames.items()}

    # ------------------------------------------------------------------ protocol

    def open(self) -> None:
        """Bind the socket and start the sender (no-op when open). Sends nothing until ``apply``."""
        if self._sender is not None:
            return
        s = self.settings
        relay = _Relay(self)
        try:
            sock = _SenderSocket(relay, s.bind_address, s.bind_port, fps=10, unicast_to=s.destination)
        except OSError as e:
            raise DriverError(f"cannot bind the sACN sender to {s.bind_address}:{s.bind_port}: {e}",
                              driver=DRIVER, transient=False) from e
        try:
            sender = sacn.sACNsender(bind_address=s.bind_address, bind_port=s.bind_port, source_name=s.source_name,
                                     fps=10, universeDiscovery=s.universe_discovery,
                                     sync_universe=s.sync_universe, socket=sock)
            sender.manual_flush = True  # data goes out only on flush: all universes in one go
            relay.handler = getattr(sender, "_sender_handler", None)  # universe discovery (sacn's own timer)
            for u in self.universes:
                sender.activate_output(u)
                out = sender[u]
                out.priority = s.priority
                out.multicast = s.destination is None
                if s.destination is not None:
                    out.destination = s.destination
            sender.start()
        except Exception:
            sock.stop()
            sock.close_socket()
            raise
        self._last_send = 0.0
        self._sender = sender
        where = s.destination or "multicast"
        log.info("sACN sender on %s:%d -> %s, universes %s, sync universe %d", s.bind_address, s.bind_port, where,
                 self.universes, s.sync_universe)

    def apply(self, levels: dict[str, float]) -> None:
        """Set every fixture's level (0..1; missing ids: 0) and send all universes in one synchronised flush."""
        frames = self.dmx_frames(levels)
        with self._lock:
            sender = self._require_open()
            for u, data in frames.items():
                sender[u].dmx_data = data
            self._flush(sender)
        self._levels = {light.id: float(levels.get(light.id, 0.0)) for light in self.lights}
        log.debug("sACN levels %s", self._levels)

    def close(self) -> None:
        """Blackout every universe, terminate the streams, stop the sender (idempotent).

        The socket is released even when the blackout cannot be sent; then a DriverError is raised.
        """
        sender = self._sender
        if sender is None:
            return
        failure: Exception | None = None
        with self._lock:
            self._sender = None  # the keepalive stops here
            try:
                for u in self.universes:
                    sender[u].dmx_data = (0,) * DMX_SLOTS
                self._flush(sender)
                for u in self.universes:  # three stream-terminated packets each (E1.31 6.2.6)
                    sender.deactivate_output(u)
            except Exception as e:  # noqa: BLE001 - the sender must be stopped whatever happened
                failure = e
        sender.stop()
        log.info("sACN sender closed (blackout %s)", "failed" if failure else "sent")
        if failure is not None:
            if isinstance(failure, DriverError):
                raise failure
            raise DriverError(f"blackout could not be sent: {failure}", driver=DRIVER) from failure

    def __enter__(self) -> SacnLights:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except DriverError:
            if exc_type is None:
                raise
            log.exception("closing the sACN lights failed while handling another error")

    # ------------------------------------------------------------------ internals

    def _require_open(self) -> sacn.sACNsender:
        if self._sender is None:
            raise DriverError("the sACN lights are not open", driver=DRIVER, transient=False)
        return self._sender

    def _flush(self, sender: sacn.sACNsender) -> None:
        """Send every universe, then the sync packet (caller holds the lock)."""
        try:
            sender.flush()
        except (OSError, ValueError) as e:
            raise DriverError(f"sending DMX failed: {e}", driver=DRIVER) from e
        self._last_send = time.monotonic()

    def _keepalive(self) -> None:
        """Called from sacn's sender thread: re-send the last frame when it is due."""
        period = self.settings.keepalive_s
        if period <= 0:
            return
        with self._lock:
            sender = self._sender
            if sender is None or self._last_send == 0.0 or time.monotonic() - self._last_send < period:
                return
            try:
                self._flush(sender)
            except DriverError as e:
                if not self._keepalive_failing:
                    log.warning("sACN keepalive failed: %s", e)
                self._keepalive_failing = True
                self._last_send = time.monotonic()  # retry after another period
            else:
                self._keepalive_failing = False


class _Relay(SenderSocketListener):
    """The sender thread's periodic callback: sacn's universe discovery, then our keepalive."""

    def __init__(self, lights: SacnLights) -> None:
        self.lights = lights
        self.handler: SenderSocketListener | None = None

    def on_periodic_callback(self, time: float) -> None:  # noqa: A002 - sacn's signature
        # an exception here would end sacn's thread silently
        if self.handler is not None:
            try:
                self.handler.on_periodic_callback(time)  # manual flush: only discovery packets go out here
            except Exception as e:  # noqa: BLE001
                log.warning("sACN universe discovery failed, disabled: %s", e)
                self.handler = None
        try:
            self.lights._keepalive()
        except Exception:  # noqa: BLE001
            log.exception("sACN keepalive failed")


class _SenderSocket(SenderSocketUDP):
    """sacn's UDP socket with two changes.

    - In unicast mode the sync packets, which sacn 1.11 always sends to the sync universe's
      multicast group, go to the unicast destination too (so nothing leaves for a multicast group).
    - The sender thread is a daemon: a process that forgets ``close`` still exits.
    """

    def __init__(self, listener: SenderSocketListener, bind_address: str, bind_port: int, fps: int,
                 unicast_to: str | None) -> None:
        super().__init__(listener, bind_address, bind_port, fps)
        self.unicast_to = unicast_to

    def start(self) -> None:
        self._thread = threading.Thread(target=self.send_loop, name="sACN sender (twinstudio)", daemon=True)
        self._thread.start()

    def send_multicast(self, data, destination: str, ttl: int) -> None:
        if self.unicast_to is not None:
            self.send_unicast(data, self.unicast_to)
        else:
            super().send_multicast(data, destination, ttl)

    def close_socket(self) -> None:
        self._socket.close()
