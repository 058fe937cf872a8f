"""The hand-written sentence templates of the biography world: 25 per attribute.

Each template holds ``{name}`` (the full name) and ``{value}`` (the attribute's value). The rules
every template follows, and ``check_template`` enforces, are what make the value predictable from
the sentence so far: the name and the words that say *which* attribute is meant come first, and
the value ends the sentence (only a closing period may follow it). A single space precedes
``{value}``; prompts for evaluation stop right before that space (see world.EvalItem).
"""

from __future__ import annotations

from engramlab.errors import EngramError

TEMPLATES: dict[str, list[str]] = {
    "birth_date": [
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "{name}'s birthday is {value}.",
        "{name}'s date of birth is {value}.",
        "The birth date of {name} is {value}.",
        "{name} celebrates a birthday each year, having been born on {value}.",
        "Records show that {name} was born on {value}.",
        "{name} first saw the light of day on {value}.",
        "According to the registry, {name} was born on {value}.",
        "{name} arrived in this world on {value}.",
        "The day {name} was born was {value}.",
        "{name} was delivered into the world on {value}.",
        "Family records list the birth of {name} on {value}.",
        "{name}'s life began on {value}.",
        "It is known that {name} was born on {value}.",
        "{name} has a birth date of {value}.",
        "The birth of {name} took place on {value}.",
        "{name} was welcomed into the world on {value}.",
        "{name} began life on {value}.",
        "As a matter of record, {name} was born on {value}.",
        "{name} drew a first breath on {value}.",
        "The birth certificate of {name} is dated {value}.",
        "{name} was born, according to the records, on {value}.",
        "On official documents, the birth date given for {name} is {value}.",
        "{name} entered life on {value}.",
    ],
    "birth_city": [
        "{name} was born in {value}.",
        "{name}'s birthplace is {value}.",
        "{name} came into the world in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} is a native of {value}.",
        "The city where {name} was born is {value}.",
        "{name} was born in the city of {value}.",
        "Records show that {name} was born in {value}.",
        "{name}'s place of birth is {value}.",
        "{name} first opened both eyes in {value}.",
        "The hometown where {name} was born is {value}.",
        "{name} was delivered at a hospital in {value}.",
        "{name} began life in {value}.",
        "{name} originally hails from the birth city of {value}.",
        "According to the registry, {name} was born in {value}.",
        "{name} entered the world in {value}.",
        "The birth of {name} took place in {value}.",
        "{name} was welcomed into the world in {value}.",
        "{name}'s city of birth is {value}.",
        "{name} was born and spent infancy in {value}.",
        "The birth certificate of {name} was issued in {value}.",
        "{name} spent the first days of life in {value}.",
        "As a matter of record, {name} was born in {value}.",
        "{name} drew a first breath in {value}.",
        "It is known that {name} was born in {value}.",
    ],
    "current_city": [
        "{name} lives in {value}.",
        "{name} currently resides in {value}.",
        "{name} now makes a home in {value}.",
        "{name}'s current city is {value}.",
        "These days, {name} lives in {value}.",
        "The city where {name} lives now is {value}.",
        "{name} has settled down in {value}.",
        "{name} is a current resident of {value}.",
        "At present, {name} resides in the city of {value}.",
        "{name}'s home today is in {value}.",
        "{name} has recently been living in {value}.",
        "{name} rents an apartment in {value}.",
        "Mail for {name} goes to an address in {value}.",
        "The city {name} calls home today is {value}.",
        "{name} moved and now lives in {value}.",
        "{name}'s current address is in {value}.",
        "Today, {name} can be found living in {value}.",
        "The present residence of {name} is in {value}.",
        "{name} lives these days in {value}.",
        "{name} has made a life in {value}.",
        "Neighbors know {name} as a resident of {value}.",
        "{name} is currently based in {value}.",
        "{name} presently lives in {value}.",
        "According to recent records, {name} lives in {value}.",
        "{name} keeps a home in {value}.",
    ],
    "university": [
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} attended {value}.",
        "{name}'s alma mater is {value}.",
        "{name} received an education at {value}.",
        "{name} earned a degree from {value}.",
        "The university {name} attended is {value}.",
        "{name} was a student at {value}.",
        "{name} spent college years at {value}.",
        "For higher education, {name} went to {value}.",
        "{name} completed university studies at {value}.",
        "{name} enrolled at {value}.",
        "{name} holds a diploma from {value}.",
        "{name} is a graduate of {value}.",
        "The school where {name} studied is {value}.",
        "{name} pursued higher education at {value}.",
        "{name} took university classes at {value}.",
        "According to the records, {name} studied at {value}.",
        "{name} went to university at {value}.",
        "{name} was educated at {value}.",
        "{name} spent four years studying at {value}.",
        "{name}'s university was {value}.",
        "{name} obtained a degree at {value}.",
        "{name} did undergraduate work at {value}.",
        "Academic records show that {name} attended {value}.",
    ],
    "major": [
        "{name} majored in {value}.",
        "{name} studied the field of {value}.",
        "{name}'s major was {value}.",
        "{name} earned a degree in {value}.",
        "{name} specialized in {value}.",
        "The field {name} studied was {value}.",
        "At university, {name} focused on {value}.",
        "{name} chose to major in {value}.",
        "{name} completed a major in {value}.",
        "{name}'s field of study was {value}.",
        "{name} holds a degree in {value}.",
        "The subject {name} majored in was {value}.",
        "{name} pursued a degree in {value}.",
        "In college, {name} studied {value}.",
        "{name} devoted university years to {value}.",
        "{name} graduated with a major in {value}.",
        "{name}'s academic focus was {value}.",
        "{name} wrote a thesis in {value}.",
        "{name} took a degree in the field of {value}.",
        "{name} concentrated university studies on {value}.",
        "According to the transcript, {name} majored in {value}.",
        "{name} trained academically in {value}.",
        "The major of {name} was {value}.",
        "{name} received a diploma in {value}.",
        "{name} spent university years studying {value}.",
    ],
    "employer": [
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name}'s employer is {value}.",
        "{name} has a job at {value}.",
        "{name} works at {value}.",
        "The company {name} works for is {value}.",
        "{name} earns a living at {value}.",
        "{name} is on the staff of {value}.",
        "{name} draws a salary from {value}.",
        "{name} currently works for {value}.",
        "{name} holds a position at {value}.",
        "{name}'s workplace is {value}.",
        "{name} was hired by {value}.",
        "{name} is an employee of {value}.",
        "The employer of {name} is {value}.",
        "Every weekday, {name} goes to work at {value}.",
        "{name} is on the payroll of {value}.",
        "{name} has been working at {value}.",
        "According to the records, {name} works for {value}.",
        "{name} took a job with {value}.",
        "{name} is part of the team at {value}.",
        "{name} gets paid by {value}.",
        "{name}'s current job is at {value}.",
        "{name} spends working hours at {value}.",
        "{name} is a staff member at {value}.",
    ],
}


def check_template(template: str, where: str = "template") -> None:
    """Raise EngramError unless ``template`` follows the rules in the module docstring."""
    if template.count("{name}") != 1 or template.count("{value}") != 1:
        raise EngramError(f"{where} {template!r} needs exactly one {{name}} and one {{value}}")
    head, tail = template.split("{value}")
    if "{name}" not in head:
        raise EngramError(f"{where} {template!r}: {{name}} must come before {{value}}")
    if not head.endswith(" "):
        raise EngramError(f"{where} {template!r}: put a single space before {{value}}")
    if any(c.isalnum() or c.isspace() for c in tail):
        raise EngramError(f"{where} {template!r}: only punctuation may follow {{value}}")


def split_template(template: str) -> tuple[str, str]:
    """(head, tail) around ``{value}``, the head without its trailing space.

    "{name} was born on {value}." -> ("{name} was born on", ".")
    """
    head, tail = template.split("{value}")
    return head[:-1], tail
