package imapwire

// StatusType is the kind of a status response (RFC 3501 7.1).
type StatusType string

// The status response types.
const (
	StatusOK      StatusType = "OK"
	StatusNo      StatusType = "NO"
	StatusBad     StatusType = "BAD"
	StatusBye     StatusType = "BYE"
	StatusPreAuth StatusType = "PREAUTH"
)

// Code is a response code, the bracketed atom that opens a status's text
// and tells a program what a person reads in the text (RFC 5530).
type Code string

// Response codes the proxy sends.
const (
	CodeAlert                Code = "ALERT"
	CodeAuthenticationFailed Code = "AUTHENTICATIONFAILED"
	CodeCannot               Code = "CANNOT"
	CodeCapability           Code = "CAPABILITY"
	CodeClosed               Code = "CLOSED"
	CodeLimit                Code = "LIMIT"
	CodePrivacyRequired      Code = "PRIVACYREQUIRED"
	CodeServerBug            Code = "SERVERBUG"
	CodeTooBig               Code = "TOOBIG"
	CodeUnavailable          Code = "UNAVAILABLE"
)

// Status is a status response: "tag NO [LIMIT] Too many sessions".
type Status struct {
	Tag  string // "" for an untagged status ("*")
	Type StatusType
	Code Code   // optional
	Arg  string // the code's arguments, written as they are (CAPABILITY's list)
	Text string // control characters are left out when written
}

// Status writes st as one line. Its text goes through Text, so that no
// status, whatever its text came from, can end the line early.
func (enc *Encoder) Status(st Status) error {
	if st.Tag == "" {
		enc.Atom("*")
	} else {
		enc.Atom(st.Tag)
	}
	enc.SP().Atom(string(st.Type))
	if st.Code != "" {
		enc.SP().Atom("[").Atom(string(st.Code))
		if st.Arg != "" {
			enc.SP().Atom(st.Arg)
		}
		enc.Atom("]")
	}
	if st.Text != "" {
		enc.SP().Text(st.Text)
	}
	return enc.CRLF()
}

// Continuation writes a continuation request: "+ text". The space is
// written even when text is empty, as for an empty SASL challenge.
func (enc *Encoder) Continuation(text string) error {
	return enc.Atom("+ ").Text(text).CRLF()
}
