"""The flows' typed parameters: what the Prefect UI renders as a form and checks before a run starts.

Prefect turns these annotations into the deployment's parameter schema. With
``enforce_parameter_schema: true`` (prefect.yaml) the server refuses a run whose
parameters do not match it — a malformed staging URL never reaches a worker —
and the flow validates them again when it starts. What a schema cannot say
(that a source name exists in the sources file) is checked by
:func:`check_sources` before anything is fetched.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from trawl.config import Source, load_sources, select_sources
from trawl.errors import ConfigError, ParameterError, StagingError
from trawl.staging import RUN_ID_PATTERN, check_run_id

__all__ = [
    "STAGING_PATTERN",
    "IncrementalOverride",
    "Politeness",
    "RunId",
    "SecretBlockName",
    "SourceName",
    "SourcesPath",
    "StagingURL",
    "check_run_ids",
    "check_sources",
    "secret_block",
]

# file://DIR, s3://BUCKET[/PREFIX] or a plain relative/absolute path; what open_stager accepts.
STAGING_PATTERN = r"^(file://.+|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[./~][^:]*|[A-Za-z0-9_][^:]*)$"


def _check_staging(url: str) -> str:
    from sinks.targets import staging_target

    try:
        staging_target(url)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return url


SourcesPath = Annotated[
    str, Field(min_length=1, description="Path of the sources file (YAML), relative to the working directory.")
]
SourceName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="A source name of the sources file.")]
StagingURL = Annotated[
    str,
    Field(
        pattern=STAGING_PATTERN,
        description="file://DIR or s3://BUCKET/PREFIX; empty for TRAWL_STAGING or the embedded default.",
        examples=["file://./.trawl/staging", "s3://my-bucket/trawl"],
    ),
    AfterValidator(_check_staging),
]
RunId = Annotated[
    str,
    Field(
        pattern=f"^{RUN_ID_PATTERN}$",
        description="A run id (letters, digits, `_`, `.`, `-`; it names staging paths).",
        examples=["20261128T121501Z-3f9a1c"],
    ),
]
SecretBlockName = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Name of a Prefect Secret block holding the database URL; empty for TRAWL_DATABASE_URL.",
    ),
]


class Politeness(BaseModel):
    """Per-run overrides of the fetch layer's politeness settings (empty fields keep the settings)."""

    model_config = ConfigDict(extra="forbid")

    per_host_concurrency: int | None = Field(default=None, ge=1, le=256, description="Requests in flight per host.")
    per_host_delay: float | None = Field(default=None, ge=0, le=3600, description="Seconds between starts per host.")
    max_retries: int | None = Field(default=None, ge=0, le=20, description="Retries of transient failures per URL.")
    total_timeout: float | None = Field(default=None, gt=0, le=3600, description="Seconds one attempt may take.")

    def overrides(self) -> dict[str, object]:
        """The settings this changes (field name → value)."""
        return self.model_dump(exclude_none=True)


class IncrementalOverride(BaseModel):
    """Per-run overrides of the incremental window of the sources with `incremental` (empty: the stored state)."""

    model_config = ConfigDict(extra="forbid")

    initial_value: str | None = Field(
        default=None,
        min_length=1,
        description="Start from this value instead of the stored state (e.g. 2024-01-01T00:00:00Z).",
        examples=["2024-01-01T00:00:00Z"],
    )
    end_value: str | None = Field(
        default=None,
        min_length=1,
        description="Up to this value: a back-fill, which leaves the stored state where it is.",
        examples=["2024-02-01T00:00:00Z"],
    )


def check_run_ids(**run_ids: str | list[str] | None) -> None:
    """ParameterError naming the parameter whose run id could not be a staging path (``../``, a newline, ...).

    Prefect checks the ``RunId`` annotation when it validates parameters; this holds for direct calls too.
    """
    for parameter, value in run_ids.items():
        for run_id in [value] if isinstance(value, str) else value or []:
            try:
                check_run_id(run_id)
            except StagingError as exc:
                raise ParameterError(parameter, str(exc)) from None


def secret_block(name: str) -> str:
    """The string a Prefect Secret block holds (``${secret:NAME}`` in a sources file); ConfigError if none.

    Synchronous: called by :func:`check_sources` in a worker thread, where Prefect's
    ``Secret.load`` runs without an event loop.
    """
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        # _sync: this thread inherited the flow run's context, which Prefect would take for an async caller.
        block: Secret[Any] = Secret.load(name, _sync=True)  # type: ignore[call-arg,assignment]
    except (ValueError, ObjectNotFound) as exc:
        raise ConfigError(f"no Prefect Secret block named {name!r}: {exc}") from None
    value = block.get()
    if not isinstance(value, str) or not value:
        raise ConfigError(f"Prefect Secret block {name!r} does not hold a string")
    return value


def check_sources(sources_file: str, names: list[str] | None) -> list[Source]:
    """The sources to run; a missing file, a bad file or an unknown name is a ParameterError.

    ``${secret:NAME}`` references are resolved from Prefect Secret blocks here, in the run.
    """
    try:
        spec = load_sources(sources_file, secret_blocks=secret_block)
    except ConfigError as exc:
        raise ParameterError("sources_file", "; ".join(exc.lines())) from None
    try:
        return select_sources(spec, names)
    except ConfigError as exc:
        raise ParameterError("sources", "; ".join(exc.lines())) from None
