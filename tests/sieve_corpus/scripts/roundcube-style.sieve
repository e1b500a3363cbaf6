require ["fileinto","imap4flags","copy","body"];
# rule:[Invoices]
if anyof (header :contains "subject" "invoice", body :text :contains "invoice")
{
	addflag "\\Flagged";
	fileinto :copy "Accounting";
}
# rule:[Attachments]
if header :contains "content-type" "multipart/mixed"
{
	fileinto "Attachments";
}
# rule:[Forwards]
if header :matches "subject" ["Fwd:*", "FW:*"]
{
	fileinto "Forwarded";
	stop;
}
