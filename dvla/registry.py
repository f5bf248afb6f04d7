"""Backend discovery through ``importlib.metadata`` entry points.

Built-in backends are registered in dvla's own ``pyproject.toml`` exactly as a third-party
package registers its own, so there is one path for both. Entry points are read eagerly
(cheap metadata) but a backend module is imported only when a pipeline asks for it, so
optional dependencies such as LIBERO cost nothing until used.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from dvla.config import BackendOptions, BackendSection, format_validation_error
from dvla.errors import ConfigError, PluginError

#: Pipeline section -> entry-point group.
GROUPS: dict[str, str] = {
    "simulator": "dvla.simulators",
    "model": "dvla.models",
    "algorithm": "dvla.algorithms",
    "optimizer": "dvla.optimizers",
}


@dataclass(frozen=True)
class BackendEntry:
    """One installed backend, before it is imported."""

    group: str
    name: str
    target: str
    package: str
    version: str
    entry_point: EntryPoint

    def load(self) -> Any:
        """Import the backend, turning an import failure into a one-line error."""
        try:
            return self.entry_point.load()
        except Exception as err:
            raise PluginError(
                f"{self.group}: backend '{self.name}' from package '{self.package}' "
                f"failed to import ({self.target}): {type(err).__name__}: {err}"
            ) from err


def discover(group: str) -> dict[str, BackendEntry]:
    """All backends registered in ``group``.

    Raises:
        PluginError: two different packages register the same name.
    """
    found: dict[str, BackendEntry] = {}
    for ep in entry_points(group=group):
        dist = ep.dist
        entry = BackendEntry(
            group=group,
            name=ep.name,
            target=ep.value,
            package=dist.metadata["Name"] if dist is not None else "<unknown>",
            version=dist.version if dist is not None else "?",
            entry_point=ep,
        )
        prior = found.get(ep.name)
        if prior is not None:
            if (prior.package, prior.target) == (entry.package, entry.target):
                continue  # the same distribution seen twice on sys.path
            raise PluginError(
                f"{group}: backend name '{ep.name}' is registered by two packages: "
                f"'{prior.package}' ({prior.target}) and '{entry.package}' ({entry.target}); "
                "uninstall one of them"
            )
        found[ep.name] = entry
    return found


def resolve(section: str, name: str) -> Any:
    """Load the backend class registered under ``name`` for a pipeline section."""
    group = GROUPS[section]
    entries = discover(group)
    entry = entries.get(name)
    if entry is None:
        installed = ", ".join(sorted(entries)) or "none"
        raise PluginError(f"{group}: no backend named '{name}' (installed: {installed})")
    return entry.load()


def build_options(
    section: str, spec: BackendSection, source: str = "<config>"
) -> tuple[Any, BackendOptions]:
    """Resolve a backend section and validate its options against the backend's model.

    Returns:
        The backend class and its validated options.
    """
    cls = resolve(section, spec.name)
    options_model: type[BackendOptions] = getattr(cls, "Options", BackendOptions)
    try:
        options = options_model.model_validate(spec.options())
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, prefix=section)) from None
    return cls, options


def installed() -> dict[str, list[BackendEntry]]:
    """Every installed backend, grouped, for ``dvla plugins``."""
    return {
        group: sorted(discover(group).values(), key=lambda e: e.name) for group in GROUPS.values()
    }
