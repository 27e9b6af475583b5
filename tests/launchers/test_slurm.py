"""SLURM: job ids, submission with retries, cancel, and states from recorded outputs.

Outputs marked "recorded" were captured from slurm 22.05 on the CI machine
(.ci/setup-slurm.sh); the sacct ones follow sacct's ``-n -P`` format, since accounting
is disabled there.
"""

from __future__ import annotations

import pytest

from launchers import JobQueueError, JobSpec, JobState, Retry, SlurmSystem, SubmissionError
from launchers._slurm import SLURM_STATES, parse_sacct, parse_scontrol, parse_squeue

# recorded: squeue -h -j 1,2,5 -o '%i|%T|%r'
SQUEUE = "1|PENDING|None\n2|PENDING|Priority\n5|RUNNING|None\n"
# recorded: every id given to squeue has left the controller
SQUEUE_GONE = "slurm_load_jobs error: Invalid job id specified\n"
# recorded
SACCT_DISABLED = "Slurm accounting storage is disabled\n"
# recorded: scontrol -o show job 4 (a script that ran `exit 3`)
SCONTROL_FAILED = (
    "JobId=4 JobName=f.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901756 "
    "Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode "
    "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 "
    "RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A Partition=debug "
    "AllocNode:Sid=localhost:5653 ReqNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 "
    "NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 "
    "Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* Command=/tmp/sl/f.sh WorkDir=/tmp/sl "
    "StdErr=/tmp/sl/slurm-4.out StdIn=/dev/null StdOut=/tmp/sl/slurm-4.out Power= \n"
)
# recorded: scontrol -o show job 5 after scancel
SCONTROL_CANCELLED = (
    "JobId=5 JobName=s.sh UserId=root(0) GroupId=root(0) JobState=CANCELLED Reason=None "
    "Dependency=(null) ExitCode=0:15 RunTime=00:00:01 TimeLimit=UNLIMITED Partition=debug\n"
)
# recorded: a job name with spaces, `$` and '=' in it, completed
SCONTROL_COMPLETED = (
    "JobId=9 JobName=my job $x=1 UserId=root(0) JobState=COMPLETED Reason=None "
    "ExitCode=0:0 StdOut=/tmp/sl/a b/x-9.out\n"
)
# recorded: scontrol -o show job 15, a job run past its 1-minute walltime
SCONTROL_TIMEOUT = (
    "JobId=15 JobName=to.sh UserId=root(0) GroupId=root(0) JobState=TIMEOUT Reason=TimeLimit "
    "Dependency=(null) ExitCode=0:15 RunTime=00:01:11 TimeLimit=00:01:00 Partition=debug\n"
)
SCONTROL_GONE = "slurm_load_jobs error: Invalid job id specified\n"
# sacct -n -P -X -o JobID,State,ExitCode
SACCT = "101|COMPLETED|0:0\n102|CANCELLED by 1000|0:15\n103|TIMEOUT|0:0\n104|OUT_OF_MEMORY|0:125\n"
# recorded
SBATCH_BAD_PARTITION = (
    "sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
)
SBATCH_TIMEOUT = (
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n"
)
SBATCH_BUSY = "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying\n"


def slurm(runner, retries=3):
    sleeps: list[float] = []
    system = SlurmSystem(
        runner=runner, retry=Retry(retries=retries, delay=1.0, sleep=sleeps.append)
    )
    return system, sleeps


@pytest.mark.parametrize(
    ("stdout", "job_id"),
    [
        ("Submitted batch job 4242\n", "4242"),
        ("4243\n", "4243"),
        ("4244;cluster2\n", "4244"),
        ("sbatch: warning: something\nSubmitted batch job 7\n", "7"),
    ],
)
def test_job_id_is_read_from_plain_and_parsable_output(stdout, job_id):
    assert SlurmSystem().parse_job_id(stdout) == job_id


def test_submit_runs_sbatch_parsable_and_returns_the_id(runner, tmp_path):
    runner.reply("sbatch", 0, "31\n")
    system, sleeps = slurm(runner)
    assert system.submit(str(tmp_path / "job.sh")) == "31"
    assert runner.calls == [(["sbatch", "--parsable", str(tmp_path / "job.sh")], None)]
    assert sleeps == []


@pytest.mark.parametrize(
    "stderr", [SBATCH_TIMEOUT, SBATCH_BUSY, "Unable to contact slurm controller (connect failure)"]
)
def test_transient_submit_failures_are_retried_with_growing_waits(runner, stderr):
    runner.reply("sbatch", 1, "", stderr).reply("sbatch", 1, "", stderr).reply("sbatch", 0, "32\n")
    system, sleeps = slurm(runner)
    assert system.submit("/s/job.sh") == "32"
    assert runner.commands() == ["sbatch"] * 3
    assert sleeps == [1.0, 2.0]


def test_transient_failure_that_persists_is_raised_after_the_retries(runner):
    runner.reply("sbatch", 1, "", SBATCH_TIMEOUT)
    system, sleeps = slurm(runner, retries=2)
    with pytest.raises(SubmissionError) as info:
        system.submit("/s/job.sh")
    error = info.value
    assert error.transient
    assert len(runner.calls) == 3 and sleeps == [1.0, 2.0]
    assert error.command == ["sbatch", "--parsable", "/s/job.sh"]
    assert "Socket timed out" in error.stderr
    assert error.script_path == "/s/job.sh"
    assert "after 3 attempts" in str(error) and "/s/job.sh" in str(error)


def test_bad_partition_is_permanent_and_not_retried(runner):
    runner.reply("sbatch", 1, "", SBATCH_BAD_PARTITION)
    system, sleeps = slurm(runner)
    with pytest.raises(SubmissionError) as info:
        system.submit("/s/job.sh")
    assert not info.value.transient
    assert info.value.returncode == 1
    assert len(runner.calls) == 1 and sleeps == []
    assert "Invalid partition name specified" in str(info.value)
    assert "permanent" in str(info.value)


def test_missing_sbatch_is_permanent_and_a_hung_one_transient(runner):
    runner.reply("sbatch", None, "", "sbatch: command not found on PATH (is it installed?)")
    system, _ = slurm(runner)
    with pytest.raises(SubmissionError) as info:
        system.submit("/s/job.sh")
    assert not info.value.transient and len(runner.calls) == 1

    hung = type(runner)().reply("sbatch", None, "", "sbatch: timed out after 60s")
    system, sleeps = slurm(hung, retries=1)
    with pytest.raises(SubmissionError) as info:
        system.submit("/s/job.sh")
    assert info.value.transient and sleeps == [1.0]


def test_unreadable_sbatch_output_is_a_submission_error(runner):
    runner.reply("sbatch", 0, "something else\n")
    system, _ = slurm(runner)
    with pytest.raises(SubmissionError, match="no job id"):
        system.submit("/s/job.sh")


def test_squeue_output_is_parsed_with_pending_reasons():
    statuses = parse_squeue(SQUEUE)
    assert [s.state for s in statuses.values()] == [
        JobState.PENDING,
        JobState.PENDING,
        JobState.RUNNING,
    ]
    assert statuses["1"].reason is None
    assert statuses["2"].reason == "Priority"
    assert statuses["5"].source == "squeue"


def test_sacct_output_gives_states_exit_codes_and_signals():
    statuses = parse_sacct(SACCT)
    assert statuses["101"].state is JobState.COMPLETED and statuses["101"].exit_code == 0
    assert statuses["102"].state is JobState.CANCELLED and statuses["102"].signal == 15
    assert statuses["102"].native_state == "CANCELLED"
    assert statuses["103"].state is JobState.TIMEOUT
    assert statuses["104"].state is JobState.OUT_OF_MEMORY


def test_scontrol_values_may_contain_spaces_and_equals_signs():
    fields = parse_scontrol(SCONTROL_COMPLETED)
    assert fields["JobName"] == "my job $x=1"
    assert fields["JobState"] == "COMPLETED"
    assert fields["StdOut"] == "/tmp/sl/a b/x-9.out"
    assert parse_scontrol(SCONTROL_FAILED)["ExitCode"] == "3:0"


def test_query_uses_one_squeue_for_queued_jobs(runner):
    runner.reply("squeue", 0, SQUEUE)
    system, _ = slurm(runner)
    statuses = system.query(["1", "2", "5"])
    assert runner.calls == [(["squeue", "-h", "-j", "1,2,5", "-o", "%i|%T|%r"], None)]
    assert statuses["5"].state is JobState.RUNNING


def test_jobs_that_left_the_queue_fall_back_to_scontrol_when_sacct_is_disabled(runner):
    runner.reply("squeue", 0, "5|RUNNING|None\n")
    runner.reply("sacct", 1, "", SACCT_DISABLED)
    runner.reply("scontrol", 0, SCONTROL_FAILED).reply("scontrol", 1, "", SCONTROL_GONE)
    system, _ = slurm(runner)
    statuses = system.query(["5", "4", "77"])
    assert list(statuses) == ["5", "4", "77"]
    assert runner.commands() == ["squeue", "sacct", "scontrol", "scontrol"]
    failed = statuses["4"]
    assert (failed.state, failed.exit_code, failed.signal) == (JobState.FAILED, 3, None)
    assert failed.reason == "NonZeroExitCode" and failed.source == "scontrol"
    assert statuses["77"].state is JobState.UNKNOWN and statuses["77"].source == "none"
    # sacct is not asked again once it said accounting is disabled.
    runner.reply("squeue", 1, "", SQUEUE_GONE)
    runner.calls.clear()
    system.query(["4"])
    assert runner.commands() == ["squeue", "scontrol"]


def test_jobs_that_left_the_queue_are_found_by_sacct_where_it_works(runner):
    runner.reply("squeue", 1, "", SQUEUE_GONE)
    runner.reply("sacct", 0, SACCT)
    system, _ = slurm(runner)
    statuses = system.query(["101", "102"])
    assert runner.calls[1][0] == [
        "sacct",
        "-n",
        "-P",
        "-X",
        "-j",
        "101,102",
        "-o",
        "JobID,State,ExitCode",
    ]
    assert statuses["102"].state is JobState.CANCELLED and statuses["102"].source == "sacct"
    assert system.sacct_available is True


@pytest.mark.parametrize(
    ("record", "state", "exit_code", "signal"),
    [
        (SCONTROL_CANCELLED, JobState.CANCELLED, 0, 15),
        (SCONTROL_COMPLETED, JobState.COMPLETED, 0, None),
        (SCONTROL_TIMEOUT, JobState.TIMEOUT, 0, 15),
    ],
)
def test_scontrol_records_translate_to_states(runner, record, state, exit_code, signal):
    runner.reply("squeue", 1, "", SQUEUE_GONE).reply("sacct", 1, "", SACCT_DISABLED)
    runner.reply("scontrol", 0, record)
    system, _ = slurm(runner)
    status = system.query(["9"])["9"]
    assert (status.state, status.exit_code, status.signal) == (state, exit_code, signal)


def test_failing_squeue_is_a_job_queue_error_marked_transient_or_not(runner):
    runner.reply("squeue", 1, "", "squeue: error: Socket timed out on send/recv operation\n")
    system, _ = slurm(runner, retries=0)
    with pytest.raises(JobQueueError) as info:
        system.query(["1"])
    assert info.value.transient
    other = type(runner)().reply("squeue", 1, "", "squeue: error: Invalid user for SlurmUser\n")
    system, _ = slurm(other, retries=0)
    with pytest.raises(JobQueueError) as info:
        system.query(["1"])
    assert not info.value.transient


def test_cancel_ignores_jobs_that_already_ended(runner):
    system, _ = slurm(runner)
    system.cancel([])
    assert runner.calls == []
    runner.reply("scancel", 0)
    system.cancel(["1", "2"])
    assert runner.calls[-1][0] == ["scancel", "1", "2"]
    runner.reply(
        "scancel",
        1,
        "",
        "scancel: error: Kill job error on job id 3: Job/step already completing or completed\n",
    )
    system.cancel(["3"])
    runner.reply(
        "scancel", 1, "", "scancel: error: Kill job error on job id 4: Access/permission denied\n"
    )
    with pytest.raises(JobQueueError, match="permission denied"):
        system.cancel(["4"])


def test_every_terminal_state_is_reachable_from_slurm_states():
    reachable = set(SLURM_STATES.values())
    assert reachable == set(JobState) - {JobState.UNKNOWN}
    assert parse_squeue("1|SOMETHING_NEW|None\n")["1"].state is JobState.UNKNOWN


def test_output_goes_to_log_directory_named_after_the_job_id():
    system = SlurmSystem()
    spec = JobSpec(name="my run", log_directory="/logs/100%/x")
    output = system.output_path(spec, "tok")
    assert output == "/logs/100%%/x/my_run-%j.log"
    assert system.log_path(output, "42") == "/logs/100%/x/my_run-42.log"
    assert system.output_path(JobSpec(), "tok") is None
    assert system.log_path("C:\\logs\\%j.log", "42") == "C:\\logs\\%j.log"


def test_a_restart_passes_its_count_and_predecessor_on_the_sbatch_command_line(runner):
    runner.reply("sbatch", 0, "33\n")
    system, _ = slurm(runner)
    variables = {"HPC_JOB_RESTARTS": "2", "HPC_JOB_RESTART_OF": "31"}
    assert system.submit("/s/job.sh", variables=variables) == "33"
    assert runner.calls == [
        (
            [
                "sbatch",
                "--parsable",
                "--export=ALL,HPC_JOB_RESTARTS=2,HPC_JOB_RESTART_OF=31",
                "/s/job.sh",
            ],
            None,
        )
    ]


@pytest.mark.parametrize(
    "variables", [{"PATH": "/x"}, {"HPC_JOB_RESTART_OF": "31,LD_PRELOAD=/evil.so"}]
)
def test_only_the_launchers_plain_variables_go_on_a_submit_command_line(runner, variables):
    system, _ = slurm(runner)
    with pytest.raises(ValueError, match="cannot pass"):
        system.submit("/s/job.sh", variables=variables)
    assert runner.calls == []
