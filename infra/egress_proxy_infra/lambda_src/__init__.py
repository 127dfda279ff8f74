"""Lambda handlers, shipped inline (CloudFormation ZipFile, at most 4096 characters each) so that a template
synthesized with -c imageUri=... keeps no assets and can still be launched from the console.

They import only boto3/botocore and the standard library (the Lambda Python runtime has both), and take their
AWS clients as arguments below the handler, so tests run the real logic against moto_server.
"""
