"""A new member of peft's closed ``PeftType`` enum, added once at run time.

``peft.utils.register_peft_method(name=...)`` is peft's public way to add a method, but it refuses any ``name``
whose upper-case form is not already a member of ``peft.utils.peft_types.PeftType``, and Python enums cannot be
subclassed or extended. `peft_type_member` adds the member the way the enum machinery itself builds members
(the ``_member_map_`` / ``_value2member_map_`` / ``_member_names_`` sunder attributes, stable since Python 3.4
and unchanged through 3.13), checks the result through the public enum API, and is idempotent. Everything that
depends on Python's enum internals is in this one function.

Example:
    >>> from peft.utils.peft_types import PeftType
    >>> member = peft_type_member("MASKED_LORA")
    >>> member is PeftType.MASKED_LORA is PeftType("MASKED_LORA") is peft_type_member("MASKED_LORA")
    True
    >>> "MASKED_LORA" in list(PeftType), member == "MASKED_LORA"
    (True, True)
"""

from __future__ import annotations

from enum import Enum


def peft_type_member(name: str) -> Enum:
    """The ``PeftType`` member called ``name`` (its value is ``name`` too), created on the first call.

    Raises ``RuntimeError`` if the enum no longer behaves as expected afterwards (a peft or Python release that
    changed it); `hf_prune` turns that into a warning that masked LoRA is unavailable.
    """
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    # Why this is needed: PeftType is closed and register_peft_method checks `name.upper() in list(PeftType)`.
    # Build the member as EnumType does for a class-body member of a `str` enum: a `str` instance of the enum
    # class carrying `_name_`/`_value_`, then make it reachable by attribute (set before it enters
    # `_member_map_`, which is what makes EnumType refuse reassignment), by name, by value and by iteration.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    if not (PeftType[name] is member and PeftType(name) is member and member in list(PeftType)
            and getattr(PeftType, name) is member):
        raise RuntimeError(f"could not add {name!r} to peft's PeftType enum: this Python/peft combination "
                           "builds enum members differently")
    return member
