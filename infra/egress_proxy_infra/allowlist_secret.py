"""The allowlist secret the proxies poll and hot-reload."""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnCondition, Fn, RemovalPolicy, SecretValue, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

#: The allowlist secret's value when AllowedDomains is empty (the proxy accepts this JSON form).
EMPTY_ALLOWLIST = '{"allowed_domains": []}'


class AllowlistSecret(Construct):
    """A Secrets Manager secret created from the AllowedDomains parameter (comma-separated, the seed's form).

    The proxy also accepts JSON {"allowed_domains": [...]}, which `egress-proxy allowlist push` may write.
    CloudFormation only rewrites the value when AllowedDomains itself changes, so pushes made between
    stack updates survive updates of other parameters.
    """

    def __init__(self, scope: Construct, id: str, *, allowed_domains: str) -> None:
        super().__init__(scope, id)
        # Empty AllowedDomains (the default) is an empty allowlist: every request is denied until the operator
        # lists what the clients need. The proxy's own AWS calls never pass through Squid, so it needs no entry.
        # A JSON document, because Secrets Manager takes no empty SecretString.
        is_empty = CfnCondition(self, "AllowedDomainsIsEmpty",
                                expression=Fn.condition_equals(allowed_domains, ""))
        is_empty.override_logical_id("AllowedDomainsIsEmpty")
        value = Fn.condition_if(is_empty.logical_id, EMPTY_ALLOWLIST, allowed_domains).to_string()
        self.secret = secretsmanager.Secret(
            self, "Secret",
            description="egress-proxy allowlist: comma-separated domains or JSON {\"allowed_domains\": [...]}",
            # Not a credential: a list of domain names, so a plain value from the parameter is fine.
            secret_string_value=SecretValue.unsafe_plain_text(value),
            # The secret only exists for this stack's proxies; the access logs (retained) are the audit trail.
            removal_policy=RemovalPolicy.DESTROY,
        )
        Validations.of(self.secret).acknowledge(Acknowledgment(
            id="CloudFormation-Validate::F3033",
            reason="SecretString is never empty: the Fn::If gives the JSON empty allowlist when AllowedDomains is "
                   "empty; the validator checks the Ref branch with the parameter's empty default."))
        NagSuppressions.add_resource_suppressions(self.secret, [NagPackSuppression(
            id="AwsSolutions-SMG4",
            reason="The secret holds the proxy's domain allowlist, not a credential; there is nothing to rotate.",
        )])

    @property
    def secret_arn(self) -> str:
        return self.secret.secret_arn

    def grant_read(self, grantee: iam.IGrantable) -> iam.Grant:
        """GetSecretValue/DescribeSecret on this secret only."""
        return self.secret.grant_read(grantee)
