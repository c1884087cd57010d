"""Guards on a night's listing: a source that lists far fewer photos than the last
completed night, or fewer new photos than asked for, fails the night before anything is
read (a wrong prefix or a missing mount looks like a quiet night otherwise); keys that do
not look like {user_id}/{file name} are warned about."""

from __future__ import annotations

from gender_pipeline.lake.keys import KEY_RULE
from gender_pipeline.lake.runs import completed
from gender_pipeline.night.words import plural, run_time
from gender_pipeline.runtime.errors import DataFailure


class ListingLooksWrong(DataFailure, RuntimeError):
    """The source lists far fewer photos than a guard allows: probably the wrong prefix.
    It says what was listed (`listed` objects, `new` of them to read)."""

    prefix = "the listing looks wrong: "

    def __init__(self, message: str, listed: int = 0, new: int = 0) -> None:
        super().__init__(message)
        self.listed, self.new = listed, new


def check_listing(listed: int, new: int, previous: list[dict], min_new_photos: int = 0,
                  max_listing_drop: float = 0.9) -> list[str]:
    """Raise ListingLooksWrong when the listing breaks a guard; return warnings otherwise.

    Guards: fewer than `min_new_photos` new photos; fewer objects listed than
    (1 - `max_listing_drop`) of what the previous run listed (1 turns this off)."""
    warnings = []
    # Only a night that completed tells what the source holds (a failed one may have failed
    # precisely because its listing looked wrong).
    last = next((r for r in reversed(previous) if r.get("listed") and completed(r)), None)
    if new < min_new_photos:
        raise ListingLooksWrong(f"{plural(new, 'new photo')}, fewer than --min-new-photos {min_new_photos}: nothing "
                                f"was scored. Check the source, or lower the guard.", listed, new)
    if last is not None and listed < (1 - max_listing_drop) * last["listed"]:
        raise ListingLooksWrong(
            f"the source lists {plural(listed, 'object')}, the run of {run_time(last, '?')} UTC listed "
            f"{last['listed']:,}: a drop of more than {max_listing_drop:.0%} usually means a wrong prefix or a "
            f"missing mount; nothing was scored. If the photos really were removed, run once with "
            f"--max-listing-drop 1 (the max_listing_drop parameter).", listed, new)
    if listed == 0:
        warnings.append("the source is empty: no object listed" + (
            "" if last is None else
            f" (the run of {run_time(last, '?')} UTC listed {plural(last['listed'], 'object')})"))
    return warnings


def key_shape_warnings(listed: int, bad_keys: int, one_user: str | None) -> list[str]:
    """Warnings when the listed keys do not look like {user_id}/{file name}: most keys have
    no user id (the source is one folder too deep), or every key has the same one (one
    folder too high)."""
    warnings = []
    if listed and bad_keys > listed / 2:
        warnings.append(f"{bad_keys} of {listed} keys are not {KEY_RULE}: is the source one "
                        f"folder too deep?")
    if listed >= 20 and one_user is not None and bad_keys < listed:
        warnings.append(f"all {listed} photos share the user id {one_user!r}: is the source one folder too high?")
    return warnings
