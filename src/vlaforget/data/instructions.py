"""Natural-language instructions for Meta-World v3 tasks: a few paraphrases per task.

Each demonstration episode gets one paraphrase (seeded), so a model sees varied wording for the same
skill. The config key `data.metaworld.instructions` ({task: [paraphrase, ...]} or {task: "text"})
replaces the built-in list of a task.
"""

from __future__ import annotations

import random

# The first paraphrase of each task is its canonical instruction (used where one text is needed).
BUILTIN: dict[str, list[str]] = {
    # embedded demo tasks (config/demo.yaml)
    "button-press-topdown-v3": [
        "press the button from the top",
        "push the button down from above",
        "press down on the top button",
        "push the button from above",
    ],
    "drawer-open-v3": [
        "open the drawer",
        "pull the drawer open",
        "pull out the drawer",
        "slide the drawer open",
    ],
    "door-open-v3": ["open the door", "pull the door open", "swing the door open", "open the cabinet door"],
    "plate-slide-v3": [
        "slide the plate into the goal",
        "push the plate into the net",
        "slide the puck into the goal",
        "move the plate into the goal",
    ],
    "drawer-close-v3": [
        "close the drawer",
        "push the drawer closed",
        "push the drawer shut",
        "slide the drawer closed",
    ],
    "button-press-v3": [
        "press the button",
        "push the button",
        "press the button on the box",
        "push the front button",
    ],
    # Continual World CW10
    "hammer-v3": [
        "hammer the nail",
        "hit the nail with the hammer",
        "drive the nail in with the hammer",
        "use the hammer on the nail",
    ],
    "push-wall-v3": [
        "push the puck past the wall",
        "push the puck around the wall to the goal",
        "slide the puck behind the wall",
        "push the block past the wall",
    ],
    "faucet-close-v3": [
        "close the faucet",
        "turn the faucet off",
        "turn off the tap",
        "rotate the faucet closed",
    ],
    "push-back-v3": [
        "push the puck back",
        "push the puck away from you",
        "slide the puck backwards",
        "push the block back to the goal",
    ],
    "stick-pull-v3": [
        "pull the container with the stick",
        "use the stick to pull the cup",
        "grab the stick and pull the container",
        "pull the can with the stick",
    ],
    "handle-press-side-v3": [
        "press the handle down from the side",
        "push the side handle down",
        "press down the handle sideways",
        "push the handle down from the side",
    ],
    "push-v3": [
        "push the puck to the goal",
        "push the block to the target",
        "slide the puck to the goal",
        "push the puck forward",
    ],
    "shelf-place-v3": [
        "place the block on the shelf",
        "put the block onto the shelf",
        "pick up the block and put it on the shelf",
        "move the block to the shelf",
    ],
    "window-close-v3": [
        "close the window",
        "slide the window closed",
        "shut the window",
        "push the window shut",
    ],
    "peg-unplug-side-v3": [
        "unplug the peg",
        "pull the peg out sideways",
        "pull the peg out of the hole",
        "remove the peg from the side",
    ],
    # other common tasks
    "reach-v3": [
        "reach the goal",
        "move the gripper to the target",
        "reach for the target",
        "move the hand to the goal",
    ],
    "pick-place-v3": [
        "pick up the puck and place it at the goal",
        "put the puck on the target",
        "pick the block and place it at the goal",
        "move the puck to the goal",
    ],
    "door-close-v3": ["close the door", "push the door closed", "swing the door shut", "shut the door"],
    "window-open-v3": [
        "open the window",
        "slide the window open",
        "push the window open",
        "slide the window to the side",
    ],
    "faucet-open-v3": ["open the faucet", "turn the faucet on", "turn on the tap", "rotate the faucet open"],
    "button-press-wall-v3": [
        "press the button behind the wall",
        "push the button past the wall",
        "reach over the wall and press the button",
        "press the walled button",
    ],
    "button-press-topdown-wall-v3": [
        "press the button from the top behind the wall",
        "push the button down from above past the wall",
        "press down on the walled button",
        "push the walled button from above",
    ],
    "coffee-button-v3": [
        "press the coffee machine button",
        "push the button on the coffee machine",
        "start the coffee machine",
        "press the coffee button",
    ],
    "coffee-push-v3": [
        "push the mug under the coffee machine",
        "slide the cup to the coffee machine",
        "push the coffee mug forward",
        "move the mug under the spout",
    ],
    "coffee-pull-v3": [
        "pull the mug from the coffee machine",
        "slide the cup away from the machine",
        "pull the coffee mug back",
        "take the mug out from under the spout",
    ],
    "handle-press-v3": [
        "press the handle down",
        "push the handle down",
        "press down on the handle",
        "push down the lever handle",
    ],
    "handle-pull-v3": ["pull the handle up", "lift the handle", "pull up on the handle", "raise the handle"],
    "handle-pull-side-v3": [
        "pull the handle up from the side",
        "lift the side handle",
        "pull up the handle sideways",
        "raise the handle from the side",
    ],
    "lever-pull-v3": ["pull the lever up", "lift the lever", "raise the lever", "pull up on the lever"],
    "plate-slide-back-v3": [
        "slide the plate back out of the goal",
        "pull the plate back",
        "slide the puck backwards out of the net",
        "pull the plate out of the goal",
    ],
    "plate-slide-side-v3": [
        "slide the plate sideways into the goal",
        "push the plate into the net from the side",
        "slide the puck sideways into the goal",
        "push the plate sideways",
    ],
    "plate-slide-back-side-v3": [
        "slide the plate sideways out of the goal",
        "pull the plate out of the net sideways",
        "slide the puck out of the goal to the side",
        "pull the plate out sideways",
    ],
    "dial-turn-v3": ["turn the dial", "rotate the dial", "spin the dial", "twist the dial"],
    "sweep-v3": [
        "sweep the puck off the table",
        "push the puck off the edge",
        "sweep the block off",
        "slide the puck off the table",
    ],
    "sweep-into-v3": [
        "sweep the puck into the hole",
        "push the puck into the hole",
        "slide the block into the hole",
        "sweep the block into the goal",
    ],
    "basketball-v3": [
        "dunk the ball into the hoop",
        "put the ball in the basket",
        "pick up the ball and dunk it",
        "place the ball into the hoop",
    ],
    "soccer-v3": [
        "kick the ball into the goal",
        "push the ball into the net",
        "score a goal with the ball",
        "push the soccer ball into the goal",
    ],
    "box-close-v3": [
        "close the box",
        "put the lid on the box",
        "place the lid onto the box",
        "cover the box with the lid",
    ],
    "bin-picking-v3": [
        "move the block to the other bin",
        "pick the block from one bin to the other",
        "transfer the cube between bins",
        "put the block in the other bin",
    ],
    "assembly-v3": [
        "put the ring on the peg",
        "assemble the ring onto the peg",
        "place the nut on the peg",
        "slide the ring onto the peg",
    ],
    "disassemble-v3": [
        "take the ring off the peg",
        "remove the nut from the peg",
        "lift the ring off the peg",
        "pull the ring off the peg",
    ],
    "peg-insert-side-v3": [
        "insert the peg into the hole",
        "push the peg into the side hole",
        "put the peg in the hole sideways",
        "slide the peg into the hole",
    ],
    "pick-out-of-hole-v3": [
        "pick the peg out of the hole",
        "lift the block out of the hole",
        "take the peg out of the hole",
        "pull the block out of the hole",
    ],
    "pick-place-wall-v3": [
        "pick up the puck and place it behind the wall",
        "lift the block over the wall to the goal",
        "move the puck over the wall",
        "put the puck on the target behind the wall",
    ],
    "reach-wall-v3": [
        "reach the goal behind the wall",
        "move the gripper over the wall to the target",
        "reach over the wall",
        "reach for the target past the wall",
    ],
    "stick-push-v3": [
        "push the container with the stick",
        "use the stick to push the cup",
        "grab the stick and push the container",
        "push the can with the stick",
    ],
    "door-lock-v3": ["lock the door", "turn the door lock", "rotate the lock down", "lock the cabinet door"],
    "door-unlock-v3": [
        "unlock the door",
        "turn the lock open",
        "rotate the lock up",
        "unlock the cabinet door",
    ],
    "hand-insert-v3": [
        "put the hand into the hole",
        "insert the gripper into the hole",
        "move the hand down into the hole",
        "reach into the hole",
    ],
}


def _from_name(task: str) -> str:
    """Plain reading of a task name for tasks without paraphrases ('foo-bar-v3' -> 'foo bar')."""
    words = [w for w in task.split("-") if not (w.startswith("v") and w[1:].isdigit())]
    return " ".join(words)


def instructions_for(task: str, overrides: dict | None = None) -> list[str]:
    """Paraphrases of `task`: the config override if given, else the built-in list."""
    over = (overrides or {}).get(task)
    if over:
        items = [over] if isinstance(over, str) else list(over)
        if not all(isinstance(s, str) and s.strip() for s in items):
            raise ValueError(
                f"data.metaworld.instructions.{task}: give a non-empty string or a list of non-empty strings"
            )
        return [s.strip() for s in items]
    return list(BUILTIN.get(task) or [_from_name(task)])


def canonical_instruction(task: str, overrides: dict | None = None) -> str:
    """The first paraphrase: the one text used when no variation is wanted (e.g. evaluation)."""
    return instructions_for(task, overrides)[0]


def sample_instruction(task: str, seed: int, overrides: dict | None = None) -> str:
    """One paraphrase chosen by `seed` (same seed -> same text in any process)."""
    options = instructions_for(task, overrides)
    return options[random.Random(f"{task}/{int(seed)}").randrange(len(options))]


def task_table(tasks: list[str], overrides: dict | None = None) -> dict[str, list[str]]:
    return {t: instructions_for(t, overrides) for t in tasks}
