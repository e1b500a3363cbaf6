# RFC 5230 4.8: :mime reason is a MIME entity
require "vacation";
vacation :mime :subject "Away" text:
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Je suis absent. Ich bin weg.
.
;
