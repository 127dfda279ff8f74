"""The moto_server fixture really serves Secrets Manager and CloudWatch over HTTP on loopback."""

from conftest import MotoServer


def test_moto_serves_secrets_manager(moto: MotoServer) -> None:
    client = moto.client("secretsmanager")
    client.create_secret(Name="fixture-check", SecretString="a.example.com")
    assert client.get_secret_value(SecretId="fixture-check")["SecretString"] == "a.example.com"
