"""memplan.report.units: the one place bytes become text; the phase and term names defined once."""

from memplan.report.units import GiB, MiB, format_bytes, gib, gib_label, memory_setting, size


def test_byte_texts():
    assert gib(80 * GiB) == "80.00" and format_bytes(80 * GiB, digits=1) == "80.0 GiB"
    assert format_bytes(450 * MiB, "MiB", digits=0) == "450 MiB"
    assert size(None) == "-" and size(512) == "512 B" and size(1536) == "1.50 KiB" and size(3 * GiB) == "3.00 GiB"
    assert gib_label(24 * GiB) == "24" and gib_label(int(1.5 * GiB)) == "1.5"


def test_memory_setting_never_states_more_than_there_is():
    assert memory_setting(80 * GiB) == "80GiB"
    assert memory_setting(23919 * MiB + MiB - 1) == "23919MiB"
    assert memory_setting(1) == "1MiB"


def test_phases_and_terms_are_the_estimators():
    from memplan.estimator.phases import PHASES, TERMS
    from memplan.runtime import meter

    assert meter.PHASES is PHASES
    assert meter.METERED_TERMS == tuple(t for t in TERMS if t != "workspace")
