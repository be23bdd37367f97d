"""What an error means to a support operator, and what to do about it (shown on the dashboard)."""

from __future__ import annotations

from typing import Literal, TypedDict

Action = Literal["retry", "contact_support", "fix_request", "wait", "none"]


class Help(TypedDict):
    label: str
    action: Action
    advice: str


_BY_SOURCE: dict[str, Help] = {
    "vendor": Help(
        label="Vendor error", action="retry",
        advice="Nothing changed on our platform: the subscription is as it was. Retrying is safe: "
               "send the cancellation again (a new request)."),
    "platform": Help(
        label="Platform error", action="contact_support",
        advice="The vendor already cancelled but our platform did not commit; support was alerted by "
               "email. Once the platform is fixed, an operator retries it as a new request (the vendor "
               "is not asked to cancel again)."),
    "payment": Help(
        label="Payment error", action="contact_support",
        advice="The cancellation is committed; the refund is not done. An operator retries the refund "
               "(never more than the charge has left) or closes the case with a note once it is settled "
               "by hand. Do not send the cancellation again."),
    "validation": Help(
        label="Rejected", action="fix_request",
        advice="Nothing changed. Correct the request (see the code) and send a new one if it still applies."),
    "notification": Help(
        label="Email problem", action="none",
        advice="The outcome stands; an email could not be sent yet and is retried automatically."),
}

_BY_CODE: dict[str, Help] = {
    "timeout": Help(
        label="No progress", action="contact_support",
        advice="The request made no progress for too long and support was alerted. It was not stopped: "
               "it may still complete by itself, and this page shows it if it does. Check the step it "
               "stopped at before doing anything by hand: retrying or refunding may apply a change twice."),
    "provisioning_in_progress": Help(
        label="Rejected", action="wait",
        advice="Another request for this subscription was in flight. Wait for it to finish, then retry "
               "if the subscription is still active."),
    "bad_input": Help(
        label="Rejected", action="contact_support",
        advice="The request could not be read and was set aside in the dead-letter topic. Contact support."),
}


def for_error(source: str, code: str) -> Help:
    return _BY_CODE.get(code) or _BY_SOURCE.get(source) or Help(
        label="Error", action="contact_support", advice="Contact support.")
