"""Which tags Docker has confirmed, and whether its event stream says they still hold.

A lookup must not answer for an image Docker has removed or re-tagged. Asking Docker on every
lookup costs a round trip through the engine (dockerd answers a few thousand inspects a second
on two cores), so a lookup asks only when it cannot know: once the agent has inspected a tag
while following the engine's image events, the answer holds until an event may contradict it.

The rules are conservative: an `untag` or `delete` of an image drops what was confirmed for it
(those events name the image id, not the tag); any other image event (`tag`, `load`, `pull`,
`import`, ...) may move any tag, so it drops everything, as does losing the stream. An inspect
that an event overtook (it was answered before the event but read after it) confirms nothing.
What remains is the stream's own delay: a change Docker made in the last moment, whose event the
agent has not read yet, is not seen by a lookup until it is.
"""

from __future__ import annotations

TARGETED_ACTIONS = frozenset({"untag", "delete"})  # the event's Actor.ID is the image they hit


class Confirmations:
    """Tags Docker confirmed naming an image id, valid while image events are followed."""

    def __init__(self) -> None:
        self.following = False  # the image event stream is connected
        self._generation = 0  # bumped by every image event and every change of `following`
        self._image_of: dict[str, str] = {}  # tag -> image id
        # image id -> tags (for untag/delete); tuples: a set per image cost 2 MiB at 10,000
        self._tags_of: dict[str, tuple[str, ...]] = {}

    def ticket(self) -> int:
        """Take before asking Docker; `confirm` with it after. Events in between void it."""
        return self._generation

    def confirm(self, tag: str, image_id: str, ticket: int) -> None:
        """Docker answered that `tag` names `image_id` (asked when `ticket` was taken)."""
        if not self.following or ticket != self._generation:
            return
        self._forget_tag(tag)
        self._image_of[tag] = image_id
        self._tags_of[image_id] = (*self._tags_of.get(image_id, ()), tag)

    def holds(self, tag: str, image_id: str) -> bool:
        """Whether no event since Docker confirmed it can have changed `tag` -> `image_id`."""
        return self._image_of.get(tag) == image_id

    def image_changed(self, action: str, image_id: str) -> None:
        """An image event was read from the stream."""
        self._generation += 1
        if action in TARGETED_ACTIONS and image_id:
            for tag in self._tags_of.pop(image_id, ()):
                del self._image_of[tag]
        else:
            self._forget_all()

    def follow(self, connected: bool) -> None:
        """The stream connected or was lost. Either way, nothing confirmed before counts."""
        self.following = connected
        self._generation += 1
        self._forget_all()

    def __len__(self) -> int:
        return len(self._image_of)

    def _forget_tag(self, tag: str) -> None:
        image_id = self._image_of.pop(tag, None)
        if image_id is not None:
            others = tuple(other for other in self._tags_of[image_id] if other != tag)
            if others:
                self._tags_of[image_id] = others
            else:
                del self._tags_of[image_id]

    def _forget_all(self) -> None:
        self._image_of.clear()
        self._tags_of.clear()
