#!/usr/bin/env python
"""Stand-in of SCT 7.x's scripts/sct_deepseg.py: one sub-parser per TASKS entry.

Like SCT's script it imports the registry lazily, touches models.TASKS at module level,
reads MODELS[m]['thr'], ['framework'] and .get('cropped_image') for every model of every
task, answers the old `-task NAME` syntax with a migration message (exit 0), and ends with
init_sct(); main(). Its main() only reports which task SCT itself would have run.
"""
import argparse
import functools
import sys
from textwrap import dedent

from spinalcordtoolbox.utils.sys import LazyLoader, init_sct

models = LazyLoader("models", globals(), "spinalcordtoolbox.deepseg.models")


class _TaskDeprecationAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs="?", metavar="TASK", help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(dedent(f"""\
            The '-task' flag has been deprecated as of SCT version 7.0.
            To resolve this, change your command from this:

            > sct_deepseg -task {values or self.metavar} ...

            To this:

            > sct_deepseg {values or self.metavar} ...
            """))
        parser.exit()


def get_parser(subparser_to_return=None):
    parser = argparse.ArgumentParser(prog="sct_deepseg", description="Segment an anatomical structure.",
                                     epilog=models.list_tasks_string(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-task", action=_TaskDeprecationAction)
    subparsers = parser.add_subparsers(metavar="TASK", dest="task")
    parsers = {}
    for task_name, task in models.TASKS.items():
        description = f"{task['description']}\n\n{task['long_description']}\n\n## Reference\n"
        if task.get("citation"):
            description += f"{task['citation']}\n\n"
        description += f"Project URL: {task['url']}"
        sub = parsers[task_name] = subparsers.add_parser(task_name, description=description)
        sub.add_argument("-i", nargs="+")
        sub.add_argument("-o")
        sub.add_argument("-install", action="store_true")
        thr = [models.MODELS[m]["thr"] for m in task["models"]]
        sub.add_argument("-thr", type=float, help=f"Default value is '{thr}'.")
        sub.add_argument("-qc")
        if all(models.MODELS[m]["framework"] == "nnunetv2" for m in task["models"]):
            sub.add_argument("-test-time-aug", action="store_true")
        if any(models.MODELS[m].get("cropped_image") for m in task["models"]):
            sub.add_argument("-box-xmin", type=int)
    return parsers[subparser_to_return] if subparser_to_return else parser


for task in models.TASKS.keys():
    globals()[task] = functools.partial(get_parser, task)


def main(argv):
    arguments = get_parser().parse_args(argv)
    if not arguments.task:
        get_parser().error("You must specify a task name.")
    print(f"SCT main: task={arguments.task} models={models.TASKS[arguments.task]['models']}")
    return 0


if __name__ == "__main__":
    init_sct()
    main(sys.argv[1:])
